"""Preprocessing (joblib, cached), weight maps, augmentation and Keras generators."""
