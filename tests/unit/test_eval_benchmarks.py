"""Benchmarks: the real MMLU, C-Eval and CMMLU copies read completely and correctly (counts, "None" options,
CRLF, line numbers after quoted line breaks), custom directories in each layout, and errors that name file,
line and field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ift_dist.eval.benchmarks import BenchmarkError, load_questions, load_shots, open_benchmark

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def physical_lines(path: Path) -> list[str]:
    """The file's lines as an editor numbers them (LF or CRLF ends)."""
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n")


def assert_sources_point_at_rows(questions) -> None:
    """Each question's "file:line" is the physical line where its row starts: it begins with the question."""
    for question in questions:
        file, line = question.source.rsplit(":", 1)
        text = physical_lines(Path(file))[int(line) - 1]
        first_line = question.question.replace("\r\n", "\n").split("\n")[0]
        start = text.split(",", 1)[1] if question.benchmark in ("ceval", "cmmlu") else text
        assert start.removeprefix('"').startswith(first_line.replace('"', '""')[:40]), question.source


def test_mmlu_complete():
    benchmark = open_benchmark("mmlu", str(DATA))
    assert (benchmark.name, benchmark.layout, benchmark.language, benchmark.eval_split) == (
        "mmlu",
        "mmlu",
        "en",
        "test",
    )
    assert len(benchmark.subjects) == 57
    assert list(benchmark.subjects) == sorted(benchmark.subjects)
    algebra = benchmark.subjects["abstract_algebra"]
    assert (algebra.name, algebra.category) == ("abstract algebra", "STEM")
    assert Counter(subject.category for subject in benchmark.subjects.values()) == {
        "STEM": 18,
        "Humanities": 13,
        "Social Sciences": 12,
        "Other": 14,
    }

    questions = load_questions(benchmark)
    assert len(questions) == 14042
    assert Counter(question.gold for question in questions) == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    assert len({question.id for question in questions}) == 14042
    assert questions[0].id == "abstract_algebra/0" and questions[0].source.endswith(
        "abstract_algebra_test.csv:1"
    )
    assert questions[-1].id == "world_religions/170"
    # Subjects in key order, rows in file order.
    subjects = [question.subject for question in questions]
    assert subjects == sorted(subjects)
    # The options that are literally "None" (10 cells) stay strings.
    nones = Counter(
        question.subject for question in questions for choice in question.choices if choice == "None"
    )
    assert nones == {
        "college_computer_science": 2,
        "college_mathematics": 3,
        "college_physics": 1,
        "electrical_engineering": 4,
    }
    assert len(load_questions(benchmark, "val")) == 1531
    assert len(load_questions(benchmark, "dev")) == 285


def test_mmlu_line_numbers_after_quoted_line_breaks():
    benchmark = open_benchmark("mmlu", str(DATA))
    # college_biology (LF): row 13 spans lines 14-17, so row 14 starts on line 18.
    biology = load_questions(benchmark, subjects=["college_biology"])
    assert "\n" in biology[13].question
    assert biology[13].source.endswith("college_biology_test.csv:14")
    assert biology[14].source.endswith("college_biology_test.csv:18")
    # high_school_physics (CRLF): row 34 spans lines 35-38; the quoted break is kept as it is in the file.
    physics = load_questions(benchmark, subjects=["high_school_physics"])
    assert b"\r\n" in benchmark.subject_file("high_school_physics", "test").read_bytes()
    assert physics[35].source.endswith("high_school_physics_test.csv:39")
    assert all("\r" not in question.question + "".join(question.choices) for question in physics)
    # Every row of files with many multi-line rows, LF and CRLF.
    for subject in (
        "college_biology",
        "high_school_physics",
        "nutrition",
        "econometrics",
        "elementary_mathematics",
    ):
        assert_sources_point_at_rows(load_questions(benchmark, subjects=[subject]))


def test_ceval_and_cmmlu_complete():
    ceval = open_benchmark("ceval", str(DATA))
    assert (ceval.layout, ceval.language, ceval.eval_split, len(ceval.subjects)) == ("ceval", "zh", "val", 52)
    assert ceval.subjects["accountant"].name == "注册会计师"
    questions = load_questions(ceval)
    assert len(questions) == 1346
    assert Counter(question.gold for question in questions) == {"A": 310, "B": 338, "C": 344, "D": 354}
    assert questions[0].source.endswith("accountant_val.csv:2")  # line 1 is the header
    assert_sources_point_at_rows(questions)
    shots = load_shots(ceval, "accountant", 5)
    assert [shot.id for shot in shots] == [f"accountant/{row}" for row in range(5)]
    assert all(shot.explanation for shot in shots)
    assert all(not question.explanation for question in questions)

    cmmlu = open_benchmark("cmmlu", str(DATA))
    assert (cmmlu.layout, cmmlu.language, cmmlu.eval_split, len(cmmlu.subjects)) == (
        "cmmlu",
        "zh",
        "test",
        67,
    )
    questions = load_questions(cmmlu)
    assert len(questions) == 11582
    assert Counter(question.gold for question in questions) == {"A": 2926, "B": 2883, "C": 2877, "D": 2896}
    assert questions[0].source.endswith("cmmlu/test/agronomy.csv:2")
    assert len(load_questions(cmmlu, "dev")) == 335


def test_limit_and_subjects():
    benchmark = open_benchmark("mmlu", str(DATA))
    questions = load_questions(benchmark, subjects=["virology", "anatomy", "virology"], limit=3)
    assert [question.id for question in questions] == [
        "anatomy/0",
        "anatomy/1",
        "anatomy/2",
        "virology/0",
        "virology/1",
        "virology/2",
    ]
    assert questions[:3] == load_questions(benchmark, subjects=["anatomy"])[:3]
    assert len(load_questions(benchmark, limit=2)) == 2 * 57
    assert len(load_questions(benchmark, subjects=["anatomy"], limit=1000)) == 135
    shots = load_shots(benchmark, "anatomy", 3)
    assert [shot.id for shot in shots] == ["anatomy/0", "anatomy/1", "anatomy/2"]
    assert all("/dev/anatomy_dev.csv:" in shot.source for shot in shots)
    assert load_shots(benchmark, "anatomy", 0) == []
    with pytest.raises(
        BenchmarkError, match=r"anatomy_dev\.csv: 6 few-shot examples asked for, the file has 5"
    ):
        load_shots(benchmark, "anatomy", 6)


def test_data_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IFT_EVAL_DATA", str(DATA))
    assert open_benchmark("cmmlu").root == DATA / "cmmlu"
    monkeypatch.setenv("IFT_EVAL_DATA", str(tmp_path))
    with pytest.raises(BenchmarkError, match=rf"{tmp_path}/mmlu: benchmark 'mmlu' not found.*IFT_EVAL_DATA"):
        open_benchmark("mmlu")
    assert open_benchmark("mmlu", str(DATA)).root == DATA / "mmlu"
    with pytest.raises(BenchmarkError, match="not a directory"):
        open_benchmark(str(tmp_path / "nowhere"))


# One small file per layout: a quoted two-line question, an option reading "None", and the CRLF line ends of
# C-Eval.
LAYOUT_FILES = {
    "mmlu": (
        "{subject}_{split}.csv",
        "",
        '"Line one\nline two?",None,b,c,d,A\nSecond?,a,b,c,d,D\n',
    ),
    "ceval": (
        "{subject}_{split}.csv",
        "id,question,A,B,C,D,answer\r\n",
        '0,"第一行\r\n第二行",None,b,c,d,A\r\n1,第二题,a,b,c,d,D\r\n',
    ),
    "cmmlu": (
        "{subject}.csv",
        ",Question,A,B,C,D,Answer\n",
        '0,"第一行\n第二行",None,b,c,d,A\n1,第二题,a,b,c,d,D\n',
    ),
}


def write_benchmark(
    root: Path, layout: str, subjects=("algebra_one", "biology"), splits=("test", "val", "dev")
):
    pattern, header, rows = LAYOUT_FILES[layout]
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            text = header + rows
            if layout == "ceval" and split == "dev":
                text = text.replace("answer\r\n", "answer,explanation\r\n").replace(",A\r\n", ",A,因为\r\n")
                text = text.replace(",D\r\n", ",D,所以\r\n")
            (root / split / pattern.format(subject=subject, split=split)).write_bytes(text.encode())
    return root


@pytest.mark.parametrize("layout", ["mmlu", "ceval", "cmmlu"])
def test_custom_directory_layout_detected(tmp_path, layout):
    root = write_benchmark(tmp_path / f"my_{layout}", layout)
    benchmark = open_benchmark(str(root) + "/")
    assert benchmark.name == f"my_{layout}"
    assert benchmark.layout == layout
    assert benchmark.language == ("en" if layout == "mmlu" else "zh")
    assert benchmark.eval_split == ("val" if layout == "ceval" else "test")
    assert list(benchmark.subjects) == ["algebra_one", "biology"]
    subject = benchmark.subjects["algebra_one"]
    assert (subject.name, subject.category) == ("algebra one", "Other")

    questions = load_questions(benchmark)
    assert [question.id for question in questions] == [
        "algebra_one/0",
        "algebra_one/1",
        "biology/0",
        "biology/1",
    ]
    first, second = questions[:2]
    assert first.benchmark == f"my_{layout}"
    assert first.question.replace("\r\n", "\n") in ("Line one\nline two?", "第一行\n第二行")
    assert first.choices == ("None", "b", "c", "d")
    assert (first.gold, second.gold) == ("A", "D")
    header_lines = 0 if layout == "mmlu" else 1
    assert first.source == f"{benchmark.subject_file('algebra_one', benchmark.eval_split)}:{1 + header_lines}"
    assert second.source.endswith(f":{3 + header_lines}")
    shots = load_shots(benchmark, "biology", 2)
    assert [shot.explanation for shot in shots] == (["因为", "所以"] if layout == "ceval" else ["", ""])


def test_custom_directory_with_mapping(tmp_path):
    root = write_benchmark(tmp_path / "mapped", "cmmlu")
    mapping = {
        "biology": {"name": "生物", "category": "STEM"},
        "algebra_one": {"name": "代数", "category": "STEM"},
    }
    (root / "mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    benchmark = open_benchmark(str(root))
    assert list(benchmark.subjects) == ["algebra_one", "biology"]
    assert benchmark.subjects["biology"].name == "生物"


def test_custom_directory_with_inconsistent_names(tmp_path):
    root = write_benchmark(tmp_path / "odd", "cmmlu")
    (root / "test" / "biology.csv").rename(root / "test" / "biology_test.csv")
    (root / "test" / "algebra_one.csv").rename(root / "test" / "algebra_one_test.csv")
    with pytest.raises(
        BenchmarkError, match=r"algebra_one_test\.csv: the rows are in the cmmlu layout.*<subject>\.csv"
    ):
        open_benchmark(str(root))
    five = tmp_path / "five" / "test"
    five.mkdir(parents=True)
    (five / "x_test.csv").write_text("q,a,b,c,A\n")
    with pytest.raises(BenchmarkError, match=r"x_test\.csv:1: fields: not a known layout.*found 5"):
        open_benchmark(str(five.parent))


def broken_file(tmp_path: Path, layout: str, bad_row: str) -> tuple[Path, Path]:
    """A benchmark whose biology test file ends with `bad_row`, after a quoted multi-line row."""
    root = write_benchmark(tmp_path / "broken", layout)
    split = "val" if layout == "ceval" else "test"
    path = root / split / LAYOUT_FILES[layout][0].format(subject="biology", split=split)
    ending = "\r\n" if layout == "ceval" else "\n"
    with path.open("ab") as handle:
        handle.write((bad_row + ending).encode())
    return root, path


# Each file holds header (if any) + a 2-line row + a 1-line row, so the bad row starts on line 4 (+1 with a
# header).
BAD_ROWS = [
    ("mmlu", "Third?,a,b,c,A", "fields: expected 6 (question,A,B,C,D,answer), found 5"),
    ("mmlu", "Third?,a,b,c,d,E", "answer: 'E' is not one of A, B, C, D"),
    ("mmlu", " ,a,b,c,d,A", "question: empty question"),
    ("mmlu", "Third?,a,,c,d,A", "B: empty option"),
    ("ceval", "2,第三题,a,b,c,d,E", "answer: 'E' is not one of A, B, C, D"),
    ("ceval", "2,第三题,a,b,c,d", "fields: expected 7 (id,question,A,B,C,D,answer), found 6"),
    ("ceval", "2,,a,b,c,d,A", "question: empty question"),
    ("cmmlu", "2,第三题,a,b,c,d,e", "Answer: 'e' is not one of A, B, C, D"),
    ("cmmlu", '2,"",a,b,c,d,A', "Question: empty question"),
]


@pytest.mark.parametrize(("layout", "bad_row", "message"), BAD_ROWS)
def test_bad_rows_named_by_file_line_and_field(tmp_path, layout, bad_row, message):
    root, path = broken_file(tmp_path, layout, bad_row)
    benchmark = open_benchmark(str(root))
    line = 4 if layout == "mmlu" else 5
    with pytest.raises(BenchmarkError) as error:
        load_questions(benchmark)
    assert str(error.value) == f"{path}:{line}: {message}"
    # The other subject, and the rows before it in no way: the whole load stops.
    assert len(load_questions(benchmark, subjects=["algebra_one"])) == 2


def test_bad_header_named(tmp_path):
    root = write_benchmark(tmp_path / "header", "ceval")
    path = root / "val" / "biology_val.csv"
    path.write_bytes(path.read_bytes().replace(b"id,question", b"id,questions"))
    with pytest.raises(BenchmarkError, match=rf"{path}:1: header: expected 'id,question,A,B,C,D,answer'"):
        load_questions(open_benchmark(str(root)))


def test_missing_subject_file_named(tmp_path):
    root = write_benchmark(tmp_path / "missing", "mmlu")
    mapping = {key: {"name": key, "category": "STEM"} for key in ("algebra_one", "biology", "chemistry")}
    (root / "mapping.json").write_text(json.dumps(mapping))
    benchmark = open_benchmark(str(root))
    with pytest.raises(
        BenchmarkError, match=rf"{root}/test/chemistry_test\.csv: missing \(subject 'chemistry' is listed"
    ):
        load_questions(benchmark)
    assert len(load_questions(benchmark, subjects=["biology"])) == 2
    with pytest.raises(BenchmarkError, match=r"split 'train' of benchmark 'missing' not found"):
        load_questions(benchmark, "train")


def test_unknown_subject_named():
    benchmark = open_benchmark("mmlu", str(DATA))
    with pytest.raises(
        BenchmarkError,
        match=r"subject 'colege_biology' is not in benchmark 'mmlu'; close matches: "
        r"college_biology",
    ):
        load_questions(benchmark, subjects=["colege_biology"])
    with pytest.raises(
        BenchmarkError, match=r"'zzz' .*known subjects: abstract_algebra, anatomy, .*world_religions"
    ):
        load_questions(benchmark, subjects=["zzz"])
    with pytest.raises(BenchmarkError, match="'zzz'"):
        load_shots(benchmark, "zzz", 1)
