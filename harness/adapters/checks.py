"""Checks an adapter makes on what it hands a method, shared by every model family."""

from __future__ import annotations

import torch

from harness.errors import InputError


class NonFiniteFeatures(InputError):
    """A method was about to score visual features that hold NaN or inf (e.g. an fp16 overflow).

    Every method would silently choose from garbage (G-Prune keeps the first k tokens, DivPrune
    repeats indices) or fail deep inside numpy, so the adapter refuses instead. `image` is the
    image's index among the images of the forward; the caller may name the document (`where`).
    """

    def __init__(self, image: int, method: str, name: str, count: int, size: int, dtype, where: str = ""):
        self.image, self.method, self.name, self.count, self.size, self.dtype = image, method, name, count, size, dtype
        self.where = where
        super().__init__(self._message())

    def _message(self) -> str:
        place = self.where or f"image {self.image} of the batch"
        advice = {torch.float16: "float16 overflows: run the model in float32 or bfloat16 (--dtype)",
                  torch.bfloat16: "run the model in float32 (--dtype float32)"}.get(
            self.dtype, "the checkpoint's weights or the inputs hold them")
        return (f"{place}: the {self.name} handed to {self.method} hold {self.count} non-finite value(s) (NaN or "
                f"inf) of {self.size}, in {str(self.dtype).replace('torch.', '')}; {advice}")

    def at(self, where: str) -> "NonFiniteFeatures":
        """The same error, naming where the image comes from (a task's document)."""
        return NonFiniteFeatures(self.image, self.method, self.name, self.count, self.size, self.dtype, where)


def check_finite(image: int, method: str, **tensors) -> None:
    """Raise NonFiniteFeatures if any of the named tensors (None skipped) holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise NonFiniteFeatures(image, method, name.replace("_", " "), int((~finite).sum()), tensor.numel(),
                                    tensor.dtype)
