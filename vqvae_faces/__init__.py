"""vqvae-faces: the modules behind `vqvae_face_main.py` (the VQ-VAE itself is `vqvae_class_keras.py`).

Each line imports only modules on the lines above it:
  errors, atomic_files          exceptions (no TensorFlow), crash-safe writes
  config                        the validated ExperimentConfig
  lfw_files                     LFW folders and archives, decoding, cache, split (no TensorFlow)
  pipeline                      tf.data: scaling, shuffles, augmentation
  replicas, compiled            steps under tf.distribute; one compiled tf.function per model
  (vqvae_class_keras)           the VQ-VAE: encoder, decoder, EMA quantizer, training loop
  gaussian_vae, token_prior     the VAE it is compared with; autoregressive priors over token grids
  token_search                  tokens chosen by decoding them; the rate term's unit of distance
  callbacks                     training policy as Keras callbacks
  model_settings                settings -> model constructor arguments, loading, compatibility
  run_folder                    a run's files: paths, lock, state, history
  visualize                     pictures
  inference                     a trained run's models: loading, faces -> tokens -> faces
  prior_data, prior_metrics     the grids a prior learns (cached per checkpoint); its code length, copying
  vqf_format                    the bytes of .vqf files and .vqfs containers (no TensorFlow)
  integer_arithmetic            exact integer layers, the same bits on every computer (NumPy only)
  integer_prior, integer_decoder  the codec's prior and the VQ-VAE's decoder in that arithmetic
  prior_stream, token_choice    the prior position by position; which tokens the codec sends
  codec, codec_files            the face codec; --encode and --decode
  training                      one run's training
  evaluation, compare, fid      metrics; JPEG, WebP and the codec's curve; FID
  prior_evaluation              a prior's figures and samples
"""

# The package name every Keras class of the project is registered under (`register_keras_serializable`).
PACKAGE = "vqvae_faces"
