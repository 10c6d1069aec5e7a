"""Real pretrained models that install offline, with their data and quality measures (the
CLI's defaults and the benchmarks use them)."""

from tensorpress.zoo import fashion, minilm, mnist, text

__all__ = ["minilm", "text", "mnist", "fashion"]
