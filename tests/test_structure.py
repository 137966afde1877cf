"""The layout rules of `rlhf/`: no import cycle among its modules (imports inside functions
count: they only defer one), no upward import of a package built on the importer, and private
library attributes only in `rlhf/compat.py`; and of the documentation: README.md a first screen,
the rest in docs/, every relative link resolving."""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "rlhf"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """module -> the rlhf modules it imports anywhere in its body, function bodies included."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            edges |= {target for target in targets if target in modules}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_rlhf():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def reachable(graph: dict, starts: set) -> set:
    """Every module some module of `starts` imports, directly or through others."""
    seen, todo = set(), list(starts)
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def upward_imports(graph: dict) -> list:
    """(module, package) where `module` imports the `__init__` of a subpackage whose own modules
    are built on `module` (import it, directly or not): a lower layer reaching up. The
    module-level graph shows no cycle there, but importing the package runs its __init__ above
    the module that the package's modules stand on."""
    found = []
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file() and name != "rlhf"}
    for package in sorted(packages):
        inside = {name for name in graph if name.startswith(package + ".")}
        below = reachable(graph, inside) - inside - {package}
        found += [(module, package) for module in sorted(below) if package in graph[module]]
    return found


def test_no_upward_import_in_rlhf():
    """The stage registry sat in rlhf/stages/__init__.py, and rlhf/runs.py and rlhf/lifecycle.py -
    which the stage modules import - imported it; now it is rlhf/registry.py, below them all."""
    assert upward_imports(import_graph()) == []
    # the check finds one: runs.py, which the stage modules stand on, importing the stages package
    planted = {**import_graph()}
    planted["rlhf.runs"] = planted["rlhf.runs"] | {"rlhf.stages"}
    assert ("rlhf.runs", "rlhf.stages") in upward_imports(planted)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_private_trainer_counters_only_in_the_compatibility_module():
    trainer = r"_total_loss_scalar|_tr_loss|_total_train_tokens|_precompute_ref_logps|_prepare_inputs|\._metrics\b"
    pattern = re.compile(trainer + r"|\._forward(_pre)?_hooks\b")  # and torch's hook tables: a hook's handle removes it
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"private library attributes outside rlhf/compat.py: {offenders}"


README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200
DATED_PHRASES = ("this machine", "not rerun", "not re-run")  # the history of a measurement, not the project
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), text may wrap
REFERENCE = re.compile(r"^[ ]{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)  # [label]: target
CODE_SPAN = re.compile(r"(`+)(?:(?!\n\s*\n).)+?\1", re.DOTALL)  # may run over a line break, not over a blank line


def markdown_pages() -> list:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str, code_spans: bool = False) -> str:
    """The text with its code blanked out (fenced and indented blocks, and inline spans unless
    `code_spans`), line breaks kept so that positions keep their line numbers: a command's
    `[0,1]` or `(...)` is no link."""
    lines, fence, previous_blank = [], None, True
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence or stripped.startswith(("```", "~~~")):
            fence = None if fence and stripped.startswith(fence) else (fence or stripped[:3])
            lines.append("")
        elif line.startswith(("    ", "\t")) and previous_blank:
            lines.append("")  # an indented code block: it starts after a blank line and goes on while indented
        else:
            previous_blank = not stripped
            lines.append(line)
    text = "\n".join(lines)
    return text if code_spans else CODE_SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group(0)), text)


def heading_anchors(path: Path) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}[ \t]+(.*?)[ \t#]*$", prose(path.read_text(encoding="utf-8"), code_spans=True), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(page: Path, root: Path = ROOT) -> list:
    """Every relative link of the page whose file (or, with #anchor, heading) does not exist."""
    text = prose(page.read_text(encoding="utf-8"))
    broken = []
    for match in [*LINK.finditer(text), *REFERENCE.finditer(text)]:
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:|//", target, re.IGNORECASE):
            continue  # https:, mailto: ...: not a file of this repository
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}:{text.count(chr(10), 0, match.start()) + 1}: {target}"
        if not resolved.exists():
            broken.append(where)
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in heading_anchors(resolved):
            broken.append(where + " (no such heading)")
    return broken


def test_readme_is_a_first_screen_and_every_doc_link_resolves():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the rest to docs/"
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 4, f"docs/ holds {len(pages)} Markdown pages, expected at least 4"
    broken = [link for page in markdown_pages() for link in broken_links(page)]
    assert not broken, f"relative links to nothing: {broken}"
    dated = [
        f"{page.relative_to(ROOT)}:{number}: {phrase!r}"
        for page in markdown_pages()
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for phrase in DATED_PHRASES
        if phrase in line.lower()
    ]
    assert not dated, f"notes on where or when something was (not) measured; say what was measured, on what: {dated}"


def test_the_link_checker_finds_broken_links_and_only_those(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x) `[code](missing.md)`\n"
        "[gone](missing.md) [no heading](there.md#nowhere) [wrapped\ntext](gone/too.md)\n\n"
        "    [in a code block](missing.md)\n\n```\n[fenced](missing.md)\n```\n\n[label]: missing-too.md\n",
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md:2: missing.md",
        "page.md:2: there.md#nowhere (no such heading)",
        "page.md:2: gone/too.md",
        "page.md:11: missing-too.md",
    ]


def test_the_stage_registry_lists_every_stage_module_and_its_config():
    """rlhf.registry.STAGES is the one list of stages: a stage module without an entry (or an entry
    without its module and conf/stage/<name>.yaml) is a stage half added."""
    import pkgutil

    import rlhf.stages
    from rlhf.registry import STAGES
    from rlhf.runs import POLICY_STAGES

    modules = {info.name for info in pkgutil.iter_modules(rlhf.stages.__path__) if not info.name.startswith("_")}
    assert modules == {name for name, stage in STAGES.items() if not stage.steps}
    assert all((ROOT / "conf" / "stage" / f"{name}.yaml").is_file() for name in STAGES)
    assert POLICY_STAGES == ("sft", "dpo", "ppo", "grpo", "rloo")  # derived: the stages whose final/ a run may start from
