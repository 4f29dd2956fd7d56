"""Data: where samples come from, how images decode, and how they split.

Submodules (import them directly; nothing heavy is re-exported here):

- :mod:`vfmtune.data.images` -- strict image decoding and folder scanning.
- :mod:`vfmtune.data.sources` -- ImageFolder, CSV manifests and packaged datasets.
- :mod:`vfmtune.data.splits` -- stratified, seeded, persisted train/val/test splits.
- :mod:`vfmtune.data.subsets` -- seeded subsets and imbalanced versions of a dataset, as manifests
  (`vfmtune.subsample`).
"""
