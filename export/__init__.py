"""Trained PyTorch models -> ONNX (QDQ) graphs with per-conv bit metadata."""
