"""The embedded synthetic world: scenes, images, region features and annotation files."""

# Bumped whenever what the world writes changes: cached world splits and tiny θ0 are keyed by it.
VERSION = 3
