"""Helpers shared by the tests."""

from __future__ import annotations

from PIL import Image

from ocrbatch.samples import synthetic_page


document_image = synthetic_page


def reference_generate(processor, model, image, text, max_new_tokens):
    import torch

    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    if generated and generated[-1] in eos:
        generated = generated[:-1]
    return generated, inputs


def write_pdf(path, pages: int, width: float = 595, height: float = 842, text: str = "Page") -> None:
    """A text PDF with ``pages`` pages."""
    import pymupdf

    with pymupdf.open() as document:
        for number in range(1, pages + 1):
            page = document.new_page(width=width, height=height)
            page.insert_text((40, 60), f"{text} {number}", fontsize=18)
            page.insert_textbox(pymupdf.Rect(40, 90, width - 40, height - 40),
                                "The quick brown fox jumps over the lazy dog. " * 8, fontsize=11)
        document.save(path)


def write_encrypted_pdf(path) -> None:
    import pymupdf

    with pymupdf.open() as document:
        document.new_page().insert_text((40, 60), "secret", fontsize=18)
        document.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")


def write_zero_page_pdf(path) -> None:
    """A well-formed PDF whose page tree is empty."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    body, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(body)


def write_png_claiming_size(path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def good_documents(folder) -> dict[str, int]:
    """Write one document of each supported kind; returns name -> page count."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "two-pages.pdf", 2)
    (folder / "sub").mkdir(exist_ok=True)
    write_pdf(folder / "sub" / "one-page.pdf", 1, width=300, height=200, text="Small")
    document_image(320, 200, 1).save(folder / "scan.png")
    document_image(260, 300, 2).save(folder / "photo.jpg", quality=90)
    document_image(240, 180, 3).save(folder / "shot.webp")
    document_image(200, 150, 4).save(folder / "old.bmp")
    frames = [document_image(220, 160, 5), document_image(220, 160, 6)]
    frames[0].save(folder / "fax.tiff", save_all=True, append_images=frames[1:])
    return {"two-pages.pdf": 2, "sub/one-page.pdf": 1, "scan.png": 1, "photo.jpg": 1, "shot.webp": 1,
            "old.bmp": 1, "fax.tiff": 2}
