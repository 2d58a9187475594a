"""Template captions for the shapes world (scenes, images, identities, stickers, edits, sounds)."""

from __future__ import annotations

from collections import Counter

from datamodules.synthetic.world import Background, ObjectSpec, SceneSpec

TEXTURE_WORDS = {"solid": "", "stripes": "striped", "checker": "checkered", "dots": "polka-dot"}
MOTION_WORDS = {
    "still": "sits still",
    "bounce": "bounces around",
    "fall": "falls and bounces on the floor",
    "orbit": "moves in a circle",
}
LOOP_WORDS = {
    "bob": "bobs up and down",
    "sway": "sways from side to side",
    "pulse": "pulses",
    "spin": "spins around",
    "circle": "moves in a small circle",
}
PHOTO_WORDS = {"china": "a temple", "flower": "a flower"}
COUNT_WORDS = {1: "once", 2: "twice"}


def identity_token(identity: int) -> str:
    """The caption token that names an identity, e.g. "zq3"."""
    return f"zq{identity}"


def describe_object(obj: ObjectSpec, size_words: bool = True) -> str:
    """'a small red striped circle' / 'the zq3 star' (identity objects are named by their token)."""
    if obj.identity is not None:
        return f"the {identity_token(obj.identity)} {obj.shape}"
    words = ["a"]
    if size_words:
        words.append("small" if obj.radius < 7 else "large" if obj.radius > 12 else "")
    words += [obj.colour, TEXTURE_WORDS[obj.texture], obj.shape]
    words = [w for w in words if w]
    if words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def describe_motion(obj: ObjectSpec) -> str:
    if obj.motion == "loop":
        return LOOP_WORDS[obj.loop]
    words = MOTION_WORDS[obj.motion]
    if obj.spin and obj.motion == "still":
        words = "spins in place"
    return words


def describe_background(background: Background) -> str:
    if background.kind == "plain":
        return f"on a plain {background.colours[0]} background"
    if background.kind == "gradient":
        return f"on a {background.colours[0]} to {background.colours[1]} gradient"
    text = f"in front of a photo of {PHOTO_WORDS[background.photo]}"
    dy, dx = background.pan
    if abs(dx) > abs(dy) and dx:
        text += f", the camera pans {'right' if dx > 0 else 'left'}"
    elif dy:
        text += f", the camera pans {'down' if dy > 0 else 'up'}"
    return text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_caption(scene: SceneSpec, still: bool = False) -> str:
    """'A red circle bounces around and a blue square sits still, on a plain white background.'"""
    if not scene.objects:
        return f"An empty scene {describe_background(scene.background)}."
    if still:
        parts = [describe_object(o) for o in scene.objects]
    else:
        parts = [f"{describe_object(o)} {describe_motion(o)}" for o in scene.objects]
    text = _join(parts)
    return text[0].upper() + text[1:] + f", {describe_background(scene.background)}."


def sticker_caption(obj: ObjectSpec) -> str:
    """'A sticker of a red striped star that sways from side to side, looping.'"""
    return f"A sticker of {describe_object(obj, size_words=False)} that {LOOP_WORDS[obj.loop]}, looping."


def sound_caption(events: list[dict], shapes: dict[int, str]) -> str:
    """'Tones of the circle twice and the star once.' from the event list ('Silence.' without events)."""
    counts = Counter(shapes[i] for event in events for i in event["objects"])
    if not counts:
        return "Silence."
    parts = [f"the {shape} {COUNT_WORDS.get(n, f'{n} times')}" for shape, n in sorted(counts.items())]
    return "Tones of " + _join(parts) + "."


def edit_instruction(kind: str, source: ObjectSpec | None, target: ObjectSpec | None) -> str:
    """'Make the red circle blue.' / 'Replace the ... with ...' / 'Add ...' / 'Remove ...'."""
    if kind == "recolour":
        return f"Make the {source.colour} {source.shape} {target.colour}."
    if kind == "replace":
        return f"Replace the {source.colour} {source.shape} with a {target.colour} {target.shape}."
    if kind == "add":
        return f"Add {describe_object(target, size_words=False)} that {describe_motion(target)}."
    if kind == "remove":
        return f"Remove the {source.colour} {source.shape}."
    raise ValueError(f"unknown edit kind {kind!r}")
