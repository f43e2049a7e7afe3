"""Docker Registry v2 / OCI distribution: :mod:`.client` resolves images and downloads
layers; :mod:`.credentials` is the per-user file that ``shifterimg login`` writes."""
