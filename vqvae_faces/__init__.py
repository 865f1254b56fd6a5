"""vqvae-faces: the modules behind `vqvae_face_main.py` (the model itself is `vqvae_class_keras.py`).

Layers, each importing only those before it:
  errors, atomic_files          exceptions (no TensorFlow), crash-safe writes
  config                        the validated ExperimentConfig
  lfw_files                     LFW folders and archives, decoding, cache, split (no TensorFlow)
  pipeline                      tf.data: scaling, shuffles, augmentation
  callbacks                     training policy as Keras callbacks
  model_settings                settings -> model constructor arguments, loading, compatibility
  run_folder                    a run's files: paths, lock, state, history
  visualize                     pictures
  training                      one run's training
  evaluation, compare           metrics and the codec comparison
  token_prior                   autoregressive priors over token grids (PixelCNN, transformer)
  prior_data, prior_metrics     the grids a prior learns (cached per checkpoint); its code length, copying
"""

# The package name every Keras class of the project is registered under (`register_keras_serializable`).
PACKAGE = "vqvae_faces"
