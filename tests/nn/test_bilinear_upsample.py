"""BilinearUpsample: the values of OpenCV's INTER_LINEAR (an independent reference) and of Keras'
UpSampling2D, on maps of unknown size inside a compiled graph."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from kseg.nn.blocks import BilinearUpsample


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_values_equal_opencv_linear_resize(factor):
    x = np.random.default_rng(factor).random((2, 5, 7, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(BilinearUpsample(factor)(x))
    expected = np.stack([cv2.resize(image, (7 * factor, 5 * factor), interpolation=cv2.INTER_LINEAR)
                         for image in x])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    keras_bilinear = keras.layers.UpSampling2D(factor, interpolation="bilinear")(x)
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(keras_bilinear), atol=1e-6)


def test_a_ramp_stays_a_ramp_inside_and_edges_are_clamped():
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1).repeat(2, axis=1)
    row = keras.ops.convert_to_numpy(BilinearUpsample(2)(x))[0, 0, :, 0]
    np.testing.assert_allclose(row, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_fits_in_a_compiled_graph_on_unknown_sizes_and_serialises(tmp_path):
    image = keras.Input((None, None, 2))
    model = keras.Model(image, keras.layers.Conv2D(1, 1)(BilinearUpsample(4, name="up")(image)))
    model.compile(optimizer="adam", loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    model.fit(rng.random((2, 8, 8, 2)), rng.random((2, 32, 32, 1)), epochs=1, verbose=0)
    x = rng.random((1, 6, 10, 2)).astype(np.float32)
    assert model.predict(x, verbose=0).shape == (1, 24, 40, 1)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(again.predict(x, verbose=0), model.predict(x, verbose=0))
