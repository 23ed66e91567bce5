"""TensorBoard pictures of the semantic models: input, truth, prediction and weight map.
"""

from __future__ import annotations

from kseg.core.pictures import picture_row
from kseg.nn.callbacks import TensorBoardPictures
from kseg.nn.predict import predict_image


class TensorBoardImages(TensorBoardPictures):
    """One picture per fixed validation image: input, ground truth, prediction and weight map side
    by side."""

    def __init__(self, inference_model, log_dir, images, truths, weights, pad_multiple=16, every=1, max_images=4):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths, weights))[:max_images]
        self.pad_multiple = pad_multiple

    def pictures(self):
        return [(f"validation/{index}: input | truth | prediction | weight map",
                 picture_row(image, truth, predict_image(self.inference_model, image, self.pad_multiple), weight))
                for index, (image, truth, weight) in enumerate(self.samples)]
