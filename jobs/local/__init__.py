"""Tools for a laptop and CI, kept out of the wheel: the demo, the local stand-in endpoint, and the
Delta jar fetcher (`make install`). Production code never imports them."""
