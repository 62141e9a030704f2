"""Drawing a scene as a PNG-ready image, for pixel backbones (ViLT) and for people to look at."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from vl_prune_plugins.world.scenes import Scene, Thing

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "gray": (130, 130, 130),
}
BACKGROUND = (30, 30, 36)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    corners = []
    for i in range(2 * points):
        radius = r if i % 2 == 0 else r * 0.45
        angle = math.pi * i / points - math.pi / 2
        corners.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return corners


def _regular(cx: float, cy: float, r: float, sides: int, turn: float = 0.0):
    return [
        (
            cx + r * math.cos(2 * math.pi * i / sides + turn),
            cy + r * math.sin(2 * math.pi * i / sides + turn),
        )
        for i in range(sides)
    ]


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, size: int) -> None:
    cx, cy, r = thing.x * size, thing.y * size, thing.radius * size
    fill = RGB[thing.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if thing.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon(_regular(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif thing.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif thing.shape == "diamond":
        draw.polygon(_regular(cx, cy, r, 4), fill=fill)
    elif thing.shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif thing.shape == "heart":
        draw.ellipse((cx - r, cy - r, cx, cy), fill=fill)
        draw.ellipse((cx, cy - r, cx + r, cy), fill=fill)
        draw.polygon([(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)], fill=fill)
    else:
        draw.polygon(_regular(cx, cy, r, 6), fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size × size RGB image."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        _draw(draw, thing, size)
    return image
