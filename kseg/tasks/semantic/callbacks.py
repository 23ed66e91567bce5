"""TensorBoard pictures of the semantic models: input, truth, prediction and weight map.
"""

from __future__ import annotations

from kseg.core.pictures import picture_row
from kseg.nn.callbacks import TensorBoardPictures
from kseg.nn.predict import predict_image
from kseg.tasks.semantic.postprocess import split_image_probability


class TensorBoardImages(TensorBoardPictures):
    """One picture per fixed validation image: input, ground truth, prediction and weight map side
    by side. A classification head's image probability (the inference model's extra last channel)
    is not drawn as a pixel channel but written as a scalar per image."""

    def __init__(self, inference_model, log_dir, images, truths, weights, pad_multiple=16, every=1, max_images=4,
                 targets: str = "mask"):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths, weights))[:max_images]
        self.pad_multiple = pad_multiple
        self.targets = targets
        self._image_probabilities: list[tuple[int, float]] = []

    def pictures(self):
        rows, self._image_probabilities = [], []
        for index, (image, truth, weight) in enumerate(self.samples):
            pixels, image_probability = split_image_probability(
                predict_image(self.inference_model, image, self.pad_multiple), self.targets)
            if image_probability is not None:
                self._image_probabilities.append((index, image_probability))
            rows.append((f"validation/{index}: input | truth | prediction | weight map",
                         picture_row(image, truth, pixels, weight)))
        return rows

    def scalars(self):
        return [(f"validation/{index}: non-empty probability", p) for index, p in self._image_probabilities]
