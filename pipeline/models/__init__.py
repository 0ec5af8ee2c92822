"""Models: cards (what a network takes and gives), PyTorch -> ONNX export, ONNX Runtime sessions."""

from .runtime import Outputs, Session, get_session
from .zoo import ModelCard, builtin_cards, resolve

__all__ = ["ModelCard", "Outputs", "Session", "builtin_cards", "get_session", "resolve"]
