"""Prediction with trained models: spots from windows now; the tiled lazy engine next."""
