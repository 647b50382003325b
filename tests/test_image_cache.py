"""harness.evaluation.image_cache: cached pixels equal the processor's, and the cache stays in its bounds."""

import numpy as np
import torch
from PIL import Image

from harness.evaluation.image_cache import CachedImageProcessor, LRUBytes


def test_the_cache_keeps_to_its_byte_budget():
    cache = LRUBytes(max_bytes=10)
    for key in "abc":
        cache.put(key, key, 4)
    # full: "c" displaced "b", the newest entry never read back; "a" stays for the next pass
    assert cache.bytes <= 10 and cache.get("b") is None and cache.get("a") == "a" and cache.get("c") == "c"
    cache.put("d", "d", 4)  # every other entry was read back: the least recently used ("a") goes
    assert cache.get("a") is None and cache.get("c") == "c" and cache.get("d") == "d"
    cache.put("huge", "x", 11)  # larger than the whole budget: not kept
    assert cache.get("huge") is None and cache.bytes <= 10


def test_a_repeated_pass_larger_than_the_cache_still_finds_what_fits():
    """A run calls the same 10 keys in every cell, 4 fit: plain LRU would find none of them in the next pass
    (each put drops the oldest, the one the pass needs next); this cache finds 3 per pass (the newest slot is
    the one that changes)."""
    cache = LRUBytes(max_bytes=4)
    for _ in range(3):
        for key in range(10):
            if cache.get(key) is None:
                cache.put(key, key, 1)
    assert (cache.misses, cache.hits) == (10 + 7 + 7, 3 + 3)
    assert cache.bytes == 4
    cache.put("x", "x", 1)
    assert cache.get("x") == "x"  # the newest entry serves an immediate repeat


def test_cached_pixels_equal_the_processors(tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(3)]
    plain = processor(text=["USER: <image><image>\nQ ASSISTANT:", "USER: <image>\nQ ASSISTANT:"],
                      images=images, padding=True, return_tensors="pt")
    processor.image_processor = CachedImageProcessor(processor.image_processor, 2 ** 30)
    for _ in range(2):
        cached = processor(text=["USER: <image><image>\nQ ASSISTANT:", "USER: <image>\nQ ASSISTANT:"],
                           images=images, padding=True, return_tensors="pt")
        assert set(cached.keys()) == set(plain.keys())
        for key in plain:
            assert torch.equal(cached[key], plain[key]), key
    cache = processor.image_processor.cache
    assert (cache.misses, cache.hits) == (3, 3)
    # the same pixels under another object hit; other pixels do not
    processor.image_processor(images=[images[0].copy()], return_tensors="pt")
    assert cache.hits == 4
    other = Image.fromarray(np.zeros((336, 336, 3), np.uint8))
    assert torch.equal(processor.image_processor(images=[other], return_tensors="pt")["pixel_values"],
                       processor.image_processor.inner(images=[other], return_tensors="pt")["pixel_values"])
    assert cache.misses == 4
