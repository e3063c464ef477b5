"""mkdocs hooks: the site's overview page is the README (its ``docs/`` links made relative), and the committed
results images the pages show (``../results/...``) are copied into the site under ``results/``."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"\]\((?:\.\./)?(results/[^)\s#]+\.png)\)")


def _images(markdown: str) -> set[str]:
    return set(IMAGE.findall(markdown))


def on_files(files, config):
    readme = (ROOT / "README.md").read_text()
    files.append(File.generated(config, "index.md", content=readme))
    pages = [readme] + [p.read_text() for p in Path(config["docs_dir"]).glob("*.md")]
    for image in sorted(set().union(*map(_images, pages))):
        if not (ROOT / image).is_file():
            continue  # left for mkdocs to report as a link whose target is missing
        files.append(File.generated(config, image, abs_src_path=str(ROOT / image)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Links written for GitHub (from the README: docs/x.md; from docs/: ../results/x.png) made site-relative."""
    if page.file.src_uri == "index.md":
        markdown = markdown.replace("](docs/", "](")
    return markdown.replace("](../results/", "](results/")
