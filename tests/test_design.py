"""Every "§n" the code cites names a section of the repository's DESIGN.md."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sections() -> set[str]:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "DESIGN.md").read_text(encoding="utf-8"), re.M)
    return set(heads)


def test_every_cited_section_exists():
    sections = _sections()
    assert {"1", "3.5", "5.1", "15"} <= sections
    missing = []
    for folder in ("alphatoken", "kernels", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number in re.findall(r"§(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
                number = number.rstrip(".")
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not missing, "sections cited but not in DESIGN.md: " + ", ".join(sorted(set(missing)))
