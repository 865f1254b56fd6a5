"""Faces found in any photo and aligned to the framing the models are trained on.

`data.face_alignment` says how a photo becomes a face:
  * `"lfw"`: the photo is an LFW-style crop (a `source_size` square, the face where deepfunneled LFW puts it),
    cut by the fixed crop;
  * `"detect"`: MTCNN finds the face and its five landmarks (eyes, nose, mouth corners); the similarity
    transform (scale, roll, shift) that best maps them onto where they sit in deepfunneled LFW crops
    (`LFW_LANDMARKS`) resamples the photo into a `source_size` frame, which then gets the fixed crop;
  * `"auto"`: `"lfw"` for a `source_size` square, `"detect"` for any other photo.

The detector is the `mtcnn` package's three networks with their trained weights read from
`models/face_detector.npz` (written by `experiments/export_detector.py`: the package itself ships them as
joblib pickles, which this program never opens).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

from vqvae_faces.config import ALIGNMENTS
from vqvae_faces.errors import DataError

log = logging.getLogger("vqvae_faces.data")

DETECTOR_WEIGHTS = Path(__file__).resolve().parent / "models" / "face_detector.npz"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Where MTCNN puts the five landmarks (x, y) in a 250x250 deepfunneled LFW crop: the mean over the
# development subset's training people (experiments/face_template.py), so that an aligned photo is framed as
# the training faces are. Scaled for other `source_size`s.
LFW_LANDMARKS = np.array(
    [[104.09, 112.51], [145.78, 111.67], [125.21, 136.53], [107.19, 158.10], [144.33, 157.38]],
    dtype=np.float64,
)
LFW_SOURCE_SIZE = 250


@dataclass
class Face:
    """One face MTCNN found: its box (x, y, width, height), confidence and landmarks (5, 2) as (x, y)."""

    box: tuple[int, int, int, int]
    confidence: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


class FaceDetector:
    """MTCNN (`mtcnn` package networks, weights from `DETECTOR_WEIGHTS`).

    Args:
        weights: the `.npz` of `<network>/<index>` arrays (pnet, rnet, onet).
        min_face_size: the smallest face searched for, in pixels of the photo.
        min_confidence: the final network's score a face needs (MTCNN's own default, 0.8, also passes
            parts of clothing and faces upside down, whose landmarks it then places as if upright).
    """

    def __init__(self, weights: Path = DETECTOR_WEIGHTS, min_face_size: int = 20, min_confidence: float = 0.95):
        from mtcnn import MTCNN
        from mtcnn.network.onet import ONet
        from mtcnn.network.pnet import PNet
        from mtcnn.network.rnet import RNet
        from mtcnn.stages import StageONet, StagePNet, StageRNet
        from mtcnn.stages.base import StageBase

        with np.load(weights, allow_pickle=False) as arrays:
            stages = []
            for stage_class, network_class, stage_id in (
                (StagePNet, PNet, 1),
                (StageRNet, RNet, 2),
                (StageONet, ONet, 3),
            ):
                network = network_class()
                network.build()
                name = network_class.__name__.lower()
                network.set_weights([arrays[f"{name}/{index}"] for index in range(len(network.get_weights()))])
                stage = stage_class.__new__(stage_class)  # its own __init__ would unpickle the package's weights
                StageBase.__init__(stage, stage_name=f"Stage {name.upper()}", stage_id=stage_id, model=network)
                stages.append(stage)
        self.min_face_size = min_face_size
        self.min_confidence = min_confidence
        self._mtcnn = MTCNN(stages=stages)

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """The faces in `rgb` ((H, W, 3) uint8), largest first."""
        # Rows of (image, x1, y1, x2, y2, confidence, 5 landmark x, 5 landmark y) in LANDMARK_NAMES order.
        rows = self._mtcnn.detect_faces(
            rgb,
            min_face_size=self.min_face_size,
            threshold_onet=self.min_confidence,
            box_format="xyxy",
            output_type="numpy",
        )
        faces = [
            Face(
                box=(round(row[1]), round(row[2]), round(row[3] - row[1]), round(row[4] - row[2])),
                confidence=float(row[5]),
                landmarks=np.stack([row[6:11], row[11:16]], axis=1).astype(np.float64),
            )
            for row in np.asarray(rows, np.float64).reshape(-1, 16)
        ]
        return sorted(faces, key=lambda face: -face.area)


class DetectorOnDemand:
    """A `FaceDetector` built on the first call (loading it costs seconds), shared by the threads that call."""

    def __init__(self, weights: Path = DETECTOR_WEIGHTS):
        self.weights = weights
        self._detector: FaceDetector | None = None
        self._lock = threading.Lock()

    def __call__(self) -> FaceDetector:
        with self._lock:
            if self._detector is None:
                log.info("loading the face detector (MTCNN) for photos that are not LFW-style crops")
                self._detector = FaceDetector(self.weights)
            return self._detector


def needs_detection(alignment: str, size: tuple[int, int], source_size: int | None) -> bool:
    """Whether a photo of `size` (width, height) is aligned by the detector under `data.face_alignment`."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"face_alignment must be one of {ALIGNMENTS}, received {alignment!r}")
    if alignment == "auto":
        return source_size is None or size != (source_size, source_size)
    return alignment == "detect"


def _template(frame_size: int) -> np.ndarray:
    """`LFW_LANDMARKS` in a `frame_size` frame."""
    return LFW_LANDMARKS * (frame_size / LFW_SOURCE_SIZE)


def _scale(transform: np.ndarray) -> float:
    """Photo pixels per frame pixel of a similarity `transform` (3, 3)."""
    return float(np.sqrt(abs(np.linalg.det(transform[:2, :2]))))


def frame_transform(landmarks: np.ndarray, frame_size: int) -> SimilarityTransform:
    """The similarity transform from a `frame_size` LFW-style frame to the photo that puts `landmarks`
    ((5, 2) photo pixels) where deepfunneled LFW has them (least squares over the five points)."""
    transform = SimilarityTransform.from_estimate(_template(frame_size), landmarks)
    if not transform:
        raise DataError("the face's landmarks are degenerate (all in one point or on one line)")
    return transform


def aligned_frame(picture: Image.Image, transform: np.ndarray, frame_size: int) -> Image.Image:
    """`picture` resampled into a `frame_size` square by `transform` ((3, 3), frame to photo pixel centres);
    what falls outside the photo is black."""
    scale = _scale(transform)
    if scale > 1:  # first a resize that averages the pixels it drops, so that the warp's samples skip none
        size = (max(1, round(picture.width / scale)), max(1, round(picture.height / scale)))
        ratio = np.array(size) / picture.size
        # Pillow's resize keeps pixel edges in place: centre x becomes (x + 0.5) * ratio - 0.5.
        transform = (
            np.array([[ratio[0], 0, ratio[0] / 2 - 0.5], [0, ratio[1], ratio[1] / 2 - 0.5], [0, 0, 1]]) @ transform
        )
        picture = picture.resize(size, Image.BILINEAR)
    # Pillow's affine maps output pixel corners to input coordinates, the transform pixel centres: shift by
    # half a pixel on both sides.
    shift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    matrix = np.linalg.inv(shift) @ transform @ shift
    return picture.transform(
        (frame_size, frame_size), Image.AFFINE, data=tuple(matrix[:2].ravel()), resample=Image.BILINEAR
    )


def locate(picture: Image.Image, frame_size: int, detector: FaceDetector) -> tuple[np.ndarray, list[Face]]:
    """The transform ((3, 3), frame to photo pixel centres) that frames the largest face of `picture` as
    deepfunneled LFW in a `frame_size` square, and the faces found. A `DataError` when there are none."""
    faces = detector.faces(np.asarray(picture.convert("RGB")))
    if not faces:
        raise DataError(
            f"no face found (face_alignment=detect looks for upright faces of at least {detector.min_face_size} px)"
        )
    transform = frame_transform(faces[0].landmarks, frame_size).params
    # MTCNN places the landmarks of a tilted face nearer to upright than they are: a second look, at the face
    # the first one turned upright, corrects the roll and the scale that are left.
    again = detector.faces(np.asarray(aligned_frame(picture, transform, frame_size).convert("RGB")))
    if again:
        centred = min(again, key=lambda face: np.abs(face.landmarks - _template(frame_size)).sum())
        transform = transform @ frame_transform(centred.landmarks, frame_size).params
    return transform, faces


def detect_and_align(picture: Image.Image, settings, detector: FaceDetector) -> tuple[Image.Image, list[str]]:
    """The largest face in `picture` aligned into a `settings.source_size` LFW-style frame, and notes for the
    user: several faces, a face upscaled to the model's input, a crop reaching past the photo's edge.
    A `DataError` when no face is found."""
    frame_size, border = settings.source_size or LFW_SOURCE_SIZE, settings.crop_border
    transform, faces = locate(picture, frame_size, detector)
    notes = []
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces found: the largest ({faces[0].box[2]}x{faces[0].box[3]} px) is used")
    upscale = settings.image_size / (_scale(transform) * (frame_size - 2 * border))
    if upscale > 1:
        notes.append(f"a small face, upscaled {upscale:.1f}x to {settings.image_size} px: expect a blurred face")
    low, high = border, frame_size - border
    corners = np.array([[low, low, 1], [high, low, 1], [low, high, 1], [high, high, 1]], np.float64) @ transform.T
    width, height = picture.size
    if corners.min() < -0.5 or (corners[:, 0] > width - 0.5).any() or (corners[:, 1] > height - 0.5).any():
        notes.append("the face's crop reaches past the photo's edge: that part is black")
    return aligned_frame(picture, transform, frame_size), notes
