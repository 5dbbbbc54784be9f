"""Every block of the README's flow section (the tour) marked ``<!-- readme-flow: KIND -->`` runs,
in order, against a real cloud server and Triton, and then every such block of the docs/ pages
(``docs/*.md``, in name order: each page continues where the tour and the pages before it ended,
in the same folder and ``$DLHEIR_HOME``): the config file (its addresses and admin token file
replaced by the test servers'), each shell line as its own ``dlheir`` process, the Python block
as a script. Bounded: each command has a time limit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlheir import config
from docs_pages import DOCS, README

MARK = re.compile(r"<!-- readme-flow: (config|shell|python) -->\n```[a-z]*\n(.*?)```", re.S)
ANY_MARK = "<!-- readme-flow:"
COMMAND_TIMEOUT = 180  # seconds per command: a hung command fails the test instead of blocking it


def readme_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("<!-- section: flows"):text.index("<!-- end section: flows -->")]
    return MARK.findall(section)


def docs_blocks() -> list[tuple[Path, list[tuple[str, str]]]]:
    """Each docs page that has marked blocks, in name order, with its blocks."""
    pages = [(page, MARK.findall(page.read_text())) for page in sorted(DOCS.glob("*.md"))]
    return [(page, blocks) for page, blocks in pages if blocks]


def flow_blocks() -> list[tuple[str, str]]:
    """The tour's blocks, then each docs page's: the order they run in."""
    return readme_blocks() + [block for _, blocks in docs_blocks() for block in blocks]


def test_the_flow_section_has_its_blocks():
    tour = [kind for kind, _ in readme_blocks()]
    assert tour[0] == "config" and "shell" in tour  # the README's tour starts from its config file
    kinds = [kind for kind, _ in flow_blocks()]
    assert kinds.count("config") == 1 and kinds.count("python") == 1 and kinds.count("shell") >= 2


def test_every_marked_block_is_one_that_runs():
    """A marker with a typo, or a README block outside the flow section, would silently not run."""
    readme = README.read_text()
    assert readme.count(ANY_MARK) == len(readme_blocks()), "a README block is marked outside the flows section"
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        assert text.count(ANY_MARK) == len(MARK.findall(text)), f"{page.name}: a marked block the test cannot read"


@pytest.mark.slow
def test_readme_flow_commands_run(tmp_path, triton_server, cloud_server, digits_small):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in (*config.ENV.values(), config.CONFIG_ENV,
                                                             config.ADMIN_TOKEN_ENV)}
    env.update(DLHEIR_HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    work = tmp_path / "work"
    images = shutil.copytree(digits_small, work / "my_images")
    query = sorted(images.glob("1/*.png"))[0]
    shutil.copy(query, work / "query.jpg")  # an uploaded image under another name (Pillow reads it by content)
    n_images = len(list(images.rglob("*.png")))
    ours = {"server": cloud_server.address, "triton": triton_server.grpc_url,
            "admin_token_file": str(cloud_server.data_dir / "admin.token")}
    outputs: list[tuple[str, str]] = []  # (command, stdout) in order

    def run(argv: list[str], what: str) -> str:
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        assert r.returncode == 0, f"{what}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    for kind, body in flow_blocks():
        if kind == "config":
            lines = []
            for line in body.splitlines():
                key = line.split("=", 1)[0].strip()
                if key in ours:  # this machine's addresses; the comment stays
                    line = re.sub(r'"[^"]*"', f'"{ours[key]}"', line, count=1)
                lines.append(line)
            (home / "config.toml").write_text("\n".join(lines) + "\n")
            assert config.load(home / "config.toml").get("collection") == "photos"
        elif kind == "shell":
            for line in body.splitlines():
                command = line.split("  #", 1)[0].strip()
                if command:
                    outputs.append((command, run(["bash", "-c", command], command)))
        else:
            script = tmp_path / "readme_flow.py"
            script.write_text(body)
            outputs.append(("python", run([sys.executable, str(script)], body)))

    def said(command: str) -> list[str]:
        return [o for c, o in outputs if c == command]

    # what the commands said is what the README says they do
    [status] = said("dlheir status")
    assert "DOWN" not in status and triton_server.grpc_url in status and cloud_server.address in status
    first, again = said("dlheir owner upload my_images")
    assert f"uploaded {n_images} images" in first
    assert "uploaded 0 images" in again and f"{n_images} already present" in again
    [listing] = said("dlheir collections list")
    assert "photos" in listing and str(n_images) in listing
    found = list((work / "results" / "search").iterdir())
    assert len(found) == 1 and "query" in found[0].name and len(list(found[0].iterdir())) == 5
    assert "deleted 1 of 1" in said("dlheir items delete --file query.jpg")[0]
    # the Python block: the deleted image comes back with its folder, the rest is already stored
    items, uploaded, already = map(int, said("python")[0].splitlines()[0].split())
    assert (items, uploaded, already) == (n_images - 1, 1, len(list(images.glob("1/*.png"))) - 1)
    assert len(list((work / "found").iterdir())) == 5
    assert "revoked" in said("dlheir owner revoke alice")[0]
    assert "deleted with its" in said("dlheir collections delete photos --yes")[0]
