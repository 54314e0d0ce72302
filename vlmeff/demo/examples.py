"""The demo's bundled examples: easy-VQA test images with one of their questions, and real photos from
scikit-image's sample data (written once to a cache folder: Gradio examples are files)."""
import tempfile
from pathlib import Path

from PIL import Image

PHOTOS = {"astronaut": "what is in the image?", "coffee": "what is on the table?", "chelsea": "what animal is this?"}
EVQA = 3                           # easy-VQA test images shown, each with its first question


def photo_paths() -> dict:
    """name -> PNG path of scikit-image's sample photos."""
    from skimage import data

    folder = Path(tempfile.gettempdir()) / "vlmeff-demo-examples"
    folder.mkdir(exist_ok=True)
    paths = {}
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).save(path)
        paths[name] = str(path)
    return paths


def examples(kind: str) -> list[list]:
    """[[image path, question]] for the page: easy-VQA first (what the embedded models know), then the photos."""
    from vlmeff.data import easyvqa

    questions, _, image_ids = easyvqa.questions("test")
    paths = easyvqa.image_paths("test")
    first = {}
    for i, image_id in enumerate(image_ids):
        first.setdefault(image_id, i)
    rows = [[str(paths[image_id]), questions[i]] for image_id, i in list(first.items())[:EVQA]]
    rows += [[path, PHOTOS[name]] for name, path in photo_paths().items()]
    return rows if kind == "lvlm" else [[path, ""] for path, _ in rows]
