"""capfilt: BLIP's CapFilt dataset bootstrapping (download, pretrain, caption, filter) on Ray."""

__version__ = "0.1.0"
