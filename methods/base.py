"""What a pruning method sees (`VisualContext`) and what it returns (`Selection`).

A method is a `@dataclass` subclass of `Method`: its fields are its hyper-parameters, validated in
`__post_init__`, and its `repr` is its provenance. Most methods only write `score`: higher means
keep, and the default `select` keeps the top-k scores (`top_k`), sorted so spatial order is
preserved. A method never touches a model: the adapter (`harness/adapters/`) fills the context and
removes the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

#: Where a method acts: on the projector outputs before the LLM, or before decoder layer K.
STAGES = ("pre_llm", "in_llm")
#: What the kept tokens' position ids become: renumbered contiguously, or their original ones.
POSITION_POLICIES = ("renumber", "original")


@dataclass
class VisualContext:
    """One image's visual tokens, and what a method may read about them.

    Everything is lazy where it costs a forward: `cls_attention()` and `vision_keys()` compute
    from the ViT's feature layer only when a method asks for them.
    """

    # (N, D) raster order: pre-LLM, the projector outputs; in-LLM, the hidden states entering layer K
    # (K-1 for methods that read the attention row there); at a later stage, the tokens still present
    features: torch.Tensor
    grid: tuple[int, int]  # (h, w) with h * w == N
    # () -> the image's seed (a hash of its pixels, so a sample's draw does not depend on its batch);
    # a callable so that only methods that draw random numbers pay for hashing the pixels.
    image_seed: Callable[[], int] = lambda: 0
    vision_features: Optional[torch.Tensor] = None  # (N, Dv) ViT feature-layer states, [CLS] dropped
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the model's projector
    cls_attention: Optional[Callable[[], torch.Tensor]] = None  # () -> (N,) [CLS]->patch, summed over heads
    vision_keys: Optional[Callable[[], torch.Tensor]] = None  # () -> (N, Dk) feature-layer keys, heads averaged
    attention_row: Optional[torch.Tensor] = None  # in-LLM: (N,) last token's attention at layer K-1, head mean
    # (M, D) the prompt's text tokens in the image's row, as `features` are taken (embeddings pre-LLM,
    # hidden states in-LLM): what a language-guided method reads; the answer being scored is not in it
    text_features: Optional[torch.Tensor] = None
    stage: int = 0  # multi-stage in-LLM methods: which stage chooses (0 first); later stages see fewer tokens

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed((int(seed) * 1_000_003 + self.image_seed()) % (2 ** 63))


@dataclass
class Selection:
    """Kept token indices (ascending) and, for merging methods, the features that replace them."""

    kept: torch.Tensor  # (k,) long, sorted ascending
    features: Optional[torch.Tensor] = None  # (k, D) replacement features, or None to keep the originals
    extra: dict = field(default_factory=dict)  # anything worth recording per image


@dataclass
class Method:
    """Base of every pruning method. Subclasses are dataclasses registered with `@register(name)`."""

    #: The kept tokens' position ids (`POSITION_POLICIES`); each method's default is its source's.
    position_policy: str = "renumber"

    stage: ClassVar[str] = "pre_llm"
    #: False for methods that ignore the budget (`none`); the runner then runs them once.
    uses_budget: ClassVar[bool] = True
    #: True for methods whose kept count is decided per image (thresholds); they report what they kept.
    adaptive: ClassVar[bool] = False
    #: in-LLM: True for methods that score with the last token's attention row (`VisualContext.attention_row`):
    #: they choose at layer K-1's input, where the row is computed; others choose from layer K's input.
    needs_attention_row: ClassVar[bool] = False

    def __post_init__(self):
        check_choice("position_policy", self.position_policy, POSITION_POLICIES)

    def validate(self, model_config) -> None:
        """Raise a clear ValueError if this method cannot run on a model with `model_config`
        (called when pruning starts, and by the runner before any cell). In-LLM methods need their
        layers inside the decoder (from 1 when they read layer K-1's attention), in increasing order."""
        if self.stage == "in_llm":
            n_layers = model_config.text_config.num_hidden_layers
            low = 1 if self.needs_attention_row else 0
            layers = self.stage_layers()
            bad = [k for k in layers if not isinstance(k, int) or isinstance(k, bool) or not low <= k < n_layers]
            if bad or not layers:
                what = "layer K" if len(layers) == 1 else "every stage's layer"
                shown = layers[0] if len(layers) == 1 else list(layers)
                raise ValueError(f"{type(self).__name__}: {what} must be in {low}..{n_layers - 1} for this model, "
                                 f"got {shown!r}")
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"{type(self).__name__}: stage layers must increase, got {list(layers)}")

    def files(self) -> list:
        """The files this method's choices depend on (a codebook, trained modules): their content is part
        of a result's key, so a retrained file is never mistaken for the old one."""
        return []

    def stage_layers(self) -> tuple:
        """In-LLM: the decoder layers before which tokens are removed, in order (one: the `layer` field K)."""
        return (getattr(self, "layer", None),)

    def stage_counts(self, n: int, k: int) -> list[int]:
        """Multi-stage: the tokens of an image part of `n` still present after each stage, the last being the
        budget's `k` (non-increasing). One stage keeps `k`."""
        return [k]

    def score(self, ctx: VisualContext) -> torch.Tensor:
        """(N,) scores, higher = keep."""
        raise NotImplementedError(f"{type(self).__name__} defines neither score() nor select()")

    def select(self, ctx: VisualContext, k: int) -> Selection:
        """Keep the k highest scores (`top_k`)."""
        return Selection(top_k(self.score(ctx).float(), k))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest of the (N,) `scores`, sorted ascending (spatial order).

    Ties go to the lower index (a stable sort; `torch.topk` does not promise which tied index it
    returns), so a selection is reproducible across devices and batches. No dtype cast here: a
    caller's float64 scores stay float64, where a cast could create ties."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_range(name: str, value, low=None, high=None, *, integer=False) -> None:
    """A clear error for a hyper-parameter outside its accepted range."""
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
