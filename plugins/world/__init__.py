"""The embedded synthetic world: scenes, images, region features and annotation files."""
