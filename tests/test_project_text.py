"""The project's text describes the software: no account of how the work on it was organised.

Every tracked text file is searched for talk of work periods, ticket numbers, lent machines, remote-run time
limits and files outside the repository; a hit fails with file:line and the matched words.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ORDINALS = r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|next|last|previous)"
PATTERNS = [
    (r"\bsessions?\b", "a work period"),
    (rf"\b{ORDINALS}\s+(gpu|device)\s+(call|run|machine)", "a work period"),
    (r"\b(issue|ticket)\s*#?\d+", "a ticket number"),
    (r"(^|[\s(])#\d+\b", "a ticket number"),
    (r"\btickets?\b", "a ticket"),
    (r"\blent\b|\blending\b", "which machines were lent"),
    (r"\bdevice[- ]calls?\b|\bgpu calls?\b", "remote-run limits"),
    (r"\b\d+-minute calls?\b|\bsame (gpu|machine), same call\b", "remote-run limits"),
    (r"\bKINDS\.md\b|\bDESIGN\.md\b|\.\./shared/DESIGN|/work/", "a file outside the repository"),
    (r"\bhelpers? (session|branch)|\bworktrees?\b", "how the work was organised"),
]
# Names from libraries that contain a flagged word: pytest's fixture scope.
ALLOWED = [r"""scope=["']session["']"""]

TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json", ""}


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in TEXT_SUFFIXES and path.is_file() and path != Path(__file__).resolve():
            yield name, path


def findings():
    patterns = [(re.compile(p, re.IGNORECASE), why) for p, why in PATTERNS]
    allowed = re.compile("|".join(ALLOWED))
    for name, path in tracked_text_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            text = allowed.sub("", line)
            for pattern, why in patterns:
                if match := pattern.search(text):
                    yield f"{name}:{number}: {why}: {match.group(0).strip()!r}"


def test_patterns_catch_process_talk_and_spare_the_allow_list():
    patterns = [re.compile(p, re.IGNORECASE) for p, _ in PATTERNS]
    hit = lambda s: any(p.search(re.compile("|".join(ALLOWED)).sub("", s)) for p in patterns)
    for text in ("the ninth session's rows", "issue 8's model", "#5's targets", "no H100 was lent",
                 "a device call returns 8 files", "see ../shared/DESIGN.md", "KINDS.md says why", "the next GPU call",
                 "fits a 10-minute call", "same GPU, same call"):
        assert hit(text), text
    for text in ('@pytest.fixture(scope="session")', "x[#0]", "the first chunk", "GPU memory (#bytes)"):
        assert not hit(text), text


def test_tracked_files_describe_the_software_only():
    found = list(findings())
    assert not found, "process talk in tracked files:\n" + "\n".join(found)
