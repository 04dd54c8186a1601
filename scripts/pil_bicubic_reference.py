"""Writes tests/data/pil_bicubic.bin: Pillow's BICUBIC resize of synthetic RGB images.

The expected bytes for `model::processor` tests (resize_matches_pillow_bicubic_bit_for_bit).
Run from the crate root: `python3 scripts/pil_bicubic_reference.py` (needs Pillow < 13; made with 12.3).
Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks much
more than the width, which changes some of these bytes; torch's uint8 kernel, which the
transformers torchvision backend uses, keeps Pillow 12's horizontal-first order.
The synthetic image formula and the case list must match `synthetic` and `PIL_CASES` in
src/model/processor.rs.
"""
from PIL import Image

CASES = [((45, 33), (56, 28)), ((100, 75), (84, 56)), ((37, 61), (28, 112)), ((300, 17), (56, 28)),
         ((60, 60), (56, 28))]


def synthetic(w, h):
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 37 + y * 11) % 256, (x * x + 3 * y * y) % 256, ((x ^ y) * 29 + 5) % 256)
                for y in range(h) for x in range(w)])
    return im


out = bytearray()
for (iw, ih), (ow, oh) in CASES:
    out += synthetic(iw, ih).resize((ow, oh), Image.BICUBIC).tobytes()
with open("tests/data/pil_bicubic.bin", "wb") as f:
    f.write(out)
print("wrote", len(out), "bytes with Pillow", Image.__version__)
