"""The results runner's own logic: the ladder's task scheduler, RESULTS.md assembly and README's generated block."""

import importlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def load(name):
    """benchmarks.NAME or experiments.NAME, imported as ``python -m`` runs it (from the repository root)."""
    folder = (
        "benchmarks" if (Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py").is_file() else "experiments"
    )
    return importlib.import_module(f"{folder}.{name}")


@pytest.fixture(scope="module")
def ladder():
    return load("ladder")


def task(ladder, tmp_path, name, deps=(), code="pass", sleep=0.3):
    """A child that records its start and end times, then leaves its `done` file."""
    done = tmp_path / f"{name}.done"
    script = (
        f"import time, pathlib; s = time.time(); time.sleep({sleep}); {code}; "
        f"pathlib.Path({str(done)!r}).write_text(f'{{s}} {{time.time()}}')"
    )
    return ladder.Task(name, [sys.executable, "-c", script], done, tuple(deps))


def span(t):
    start, end = map(float, t.done.read_text().split())
    return start, end


def test_scheduler_respects_dependencies_and_the_job_limit(ladder, tmp_path):
    a, b = task(ladder, tmp_path, "a"), task(ladder, tmp_path, "b")
    c = task(ladder, tmp_path, "c", deps=("a", "b"))
    d = task(ladder, tmp_path, "d", deps=("a",))
    logs = tmp_path / "logs"
    logs.mkdir()
    ladder.schedule([c, d, a, b], jobs=2, log_dir=logs, started=time.time())
    assert all(t.done.is_file() for t in (a, b, c, d))
    assert span(c)[0] >= max(span(a)[1], span(b)[1]) and span(d)[0] >= span(a)[1]
    events = sorted([(s, 1) for s, _ in map(span, (a, b, c, d))] + [(e, -1) for _, e in map(span, (a, b, c, d))])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 2


def test_scheduler_skips_finished_tasks_and_stops_on_a_failure(ladder, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    finished = task(ladder, tmp_path, "finished", code="raise SystemExit('must not run again')")
    finished.done.write_text("0 0")
    bad = task(ladder, tmp_path, "bad", code="raise SystemExit(3)")
    after = task(ladder, tmp_path, "after", deps=("bad",))
    with pytest.raises(RuntimeError, match=r"bad failed \(exit 3\).*bad\.log"):
        ladder.schedule([finished, bad, after], jobs=2, log_dir=logs, started=time.time())
    assert finished.done.read_text() == "0 0" and not after.done.exists()
    # a task finished by a run of its own while it waited for a slot is skipped too
    other = task(ladder, tmp_path, "other", code="raise SystemExit('must not run: finished meanwhile')")
    first = task(ladder, tmp_path, "first", code=f"pathlib.Path({str(other.done)!r}).write_text('1 1')")
    ladder.schedule([first, other], jobs=1, log_dir=logs, started=time.time())
    assert other.done.read_text() == "1 1" and first.done.is_file()


def test_results_page_and_readme_block_come_from_the_generated_pages(tmp_path, monkeypatch, ladder):
    run_all = load("run_all")
    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(run_all, "DOCS", docs)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    (docs / "memory.md").write_text("# Memory page\n\nmeasured 1.23\n\n## A part\n\ntext\n")
    seeds = {
        str(s): {
            rung: {"instance": {"recall@1": 0.1 * (i + 1) + 0.01 * s, "recall@5": 0.5, "recall@10": 0.9}}
            for i, rung in enumerate(ladder.RUNGS)
        }
        for s in (0, 1)
    }
    (docs / "ladder.json").write_text(json.dumps({"seeds": seeds}))
    out = run_all.assemble({"memory": 90.0, "_full_run": {"seconds": 1800, "machine": "test box"}})
    page = out.read_text()
    assert "## Memory: LoRA vs QLoRA" in page and "### A part" in page and "measured 1.23" in page
    assert "# Memory page" not in page and "1.5 min" in page and "30.0 min on: test box" in page
    assert "ladder.md" not in page  # pages that do not exist are not linked

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_all.README_BEGIN}\nold\n{run_all.README_END}\noutro\n")
    assert run_all.update_readme()
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert f"| {ladder.RUNGS[0]} | 10.5 ± 0.7 | 50.0 ± 0.0 | 90.0 ± 0.0 |" in text  # sample sd (ddof=1)


def test_ladder_report_without_the_stage1_ablation(ladder, tmp_path):
    def metrics(r1):
        return {
            "instance": {"recall@1": r1, "recall@5": 0.8, "recall@10": 0.9, "mAP@10": 0.4},
            "instance_plain_gallery": {"recall@1": r1 - 0.05},
            "coarse": {"mAP@1": 0.9},
            "image_to_text": {"recall@1": 0.1},
            "text_to_image": {"recall@1": 0.1},
        }

    per_seed = {
        s: {
            **{rung: metrics(0.40 + 0.01 * i + 0.02 * s) for i, rung in enumerate(ladder.RUNGS)},
            "InfoNCE": metrics(0.40 + 0.02 * s),
            "AGCL": metrics(0.43 + 0.02 * s),
        }
        for s in (0, 1)
    }
    out = tmp_path / "ladder.md"
    ladder.write_report(out, per_seed, "test box", 60.0, 2, " --stage1_ablation false")
    text = out.read_text()
    assert "--stage1_ablation false" in text and "were not run here" in text
    # seeds 0 and 1 give 41 and 43 on the second rung: sample sd (ddof=1) 1.4; every paired difference is +1
    plus_one = "+1.0 ± 0.0 (95% CI +1.0 to +1.0, n = 2)"
    assert f"| {ladder.RUNGS[1]} | 42.0 ± 1.4 |" in text and f"| {plus_one} |" in text
    assert (
        "| AGCL | 44.0 ± 1.4 | 80.0 ± 0.0 | 90.0 ± 0.0 | 40.0 ± 0.0 | +3.0 ± 0.0 (95% CI +3.0 to +3.0, n = 2) |" in text
    )
    assert (
        f"| RAR − SFT | +1.9 | {plus_one} | reproduced (interim: n = 2 < 5) |" in text
        and f"| CIT − RAR | — | {plus_one} |" in text
    )
    assert "| + weighting |" not in text and (tmp_path / "ladder.png").is_file() and "![ladder](ladder.png)" in text
    other = tmp_path / "ladder_paper.md"  # a second ladder's page keeps its own plot beside it
    ladder.write_report(other, per_seed, "test box", 60.0, 2)
    assert (tmp_path / "ladder_paper.png").is_file() and "![ladder](ladder_paper.png)" in other.read_text()
    # The second protocol's table: both sides 41.0, plain gallery 5 points lower, each with its own deltas.
    assert f"| {ladder.RUNGS[0]} | 41.0 ± 1.4 |  | 36.0 ± 1.4 |  |" in text
    assert f"| {ladder.RUNGS[1]} | 42.0 ± 1.4 | {plus_one} | 37.0 ± 1.4 | {plus_one} |" in text
    assert "teacher gallery" not in text  # only where every rung of every seed was measured against it
    for runs in per_seed.values():
        for metrics_of in runs.values():
            metrics_of["instance_teacher_gallery"] = {"recall@1": metrics_of["instance"]["recall@1"] - 0.10}
    ladder.write_report(out, per_seed, "test box", 60.0, 2, " --stage1_ablation false")
    text = out.read_text()
    assert "| rung | both sides R@1 | Δ | plain gallery R@1 | Δ | teacher gallery R@1 | Δ |" in text
    assert (
        f"| {ladder.RUNGS[1]} | 42.0 ± 1.4 | {plus_one} | 37.0 ± 1.4 | {plus_one} | 32.0 ± 1.4 | {plus_one} |" in text
    )


def test_attribute_headroom_counts_emitted_right_and_perceived_values_per_key():
    import datasets

    headroom = load("attribute_headroom")
    ds = datasets.Dataset.from_dict(
        {
            "title": ["Acme red mug size M", "mug", "mug with green trim"],
            "true_attributes": [
                {"brand": "acme", "color": "red", "size": "M"},
                {"brand": "lumo", "color": "blue", "size": "S"},
                {"brand": "lumo", "color": "black", "size": "L"},
            ],
            "attributes": [{}, {}, {}],
        }
    )
    generated = ["brand: acme; color: blue; size: m", "color: blue; size: l; shipping: free", "oops"]
    rows = headroom.key_accuracy(ds, generated)
    assert rows["brand"]["emitted"] == 1 / 3 and rows["brand"]["right"] == 1.0
    assert math.isnan(rows["brand"]["right_when_not_in_title"])  # "Acme" is in the title: copied, not perceived
    assert rows["color"]["emitted"] == 2 / 3 and rows["color"]["right"] == 0.5
    assert rows["color"]["right_when_not_in_title"] == 1.0  # listing 0's red is in its title: only listing 1 counts
    assert rows["size"]["right"] == 0.5 and rows["size"]["right_when_not_in_title"] == 0.0  # "size: l" vs S, not stated
    assert rows["shipping"]["right"] == 0.0  # a key the reference does not have is never right
    assert headroom._states("nice size M mug", "M") and not headroom._states("small mug", "M")


def test_reward_signal_variants_change_the_sft_line_in_one_way_each():
    signal = load("reward_signal")
    sft = {"brand": "acme", "category": "mug", "color": "red", "pattern": "striped", "size": "m"}
    true = {"brand": "lumo", "category": "mug", "color": "red", "pattern": "dotted", "size": "M", "logo": "star"}
    lines = signal.variants(sft, true)
    assert lines["SFT line (the policy's own)"] == sft
    assert lines["true attributes"] == true
    assert lines["SFT, wrong values removed (oracle)"] == {"category": "mug", "color": "red", "size": "m"}  # case-blind
    assert lines["SFT without pattern, logo, size, brand"] == {"category": "mug", "color": "red"}
    wrong = lines["SFT with a wrong colour"]
    assert wrong["color"] != "red" and {k: v for k, v in wrong.items() if k != "color"} == {
        k: v for k, v in sft.items() if k != "color"
    }
    assert lines["colour only (SFT's)"] == {"color": "red"}


def test_reward_signal_noise_rows_measure_the_spread_within_a_listing_and_the_best_sample():
    import numpy as np

    signal = load("reward_signal")
    table = {"a": 0.5, "b": 0.0, "c": 1.0, "d": -0.5}  # completion text -> reward, the same for every listing

    def reward(completions, listing_id):
        return [table[c] for c in completions]

    samples = [["a", "b"], ["c", "b"], ["a", "d"]]  # [draw][listing]: listing 0 draws a, c, a; listing 1 b, b, d
    base = np.array([0.5, 0.0])  # each listing's SFT line
    lines = signal.noise_rows(reward, ["L0", "L1"], samples, base, headroom=0.1, temperature=1.0)
    spreads = [np.std([0.5, 1.0, 0.5], ddof=1), np.std([0.0, 0.0, -0.5], ddof=1)]
    sigma = np.mean(spreads)
    assert lines[0].split(" | ")[1:3] == [
        f"{np.mean([0.5, 1.0, 0.5, 0.0, 0.0, -0.5]):+.3f}",
        f"{(0.5 - 0.5) / 6:+.3f}",
    ]  # diffs 0, +0.5, 0 and 0, 0, -0.5
    assert lines[1].split(" | ")[1:3] == ["+0.500", "+0.250"]  # best per listing: 1.0 and 0.0, minus 0.5 and 0.0
    assert f"σ = {sigma:.3f}" in lines[-1] and f"{(sigma / 0.1) ** 2:,.0f} samples" in lines[-1]


def test_errors_by_key_finds_each_familys_varying_key_and_its_chance_level():
    import datasets

    errors = load("errors_by_key")
    ds = datasets.Dataset.from_dict(
        {
            "family_id": ["F0"] * 5 + ["F1"] * 2,
            "product_id": ["a", "a", "a", "b", "b", "c", "c"],
            "true_attributes": [{"color": "red", "logo": "star"}] * 3
            + [{"color": "red", "logo": "moon"}] * 2
            + [{"color": "blue", "logo": "star"}] * 2,
        }
    )
    keys = errors.varying_keys(ds)
    assert keys == ["logo"] * 5 + ["single product"] * 2
    chance = errors.family_chance(ds, keys)
    # a's listings: 2 of the 4 others in the family are positives; b's: 1 of 4; c is alone in its family.
    assert chance["logo"] == pytest.approx((3 * 2 / 4 + 2 * 1 / 4) / 5)
    assert chance["single product"] == 1.0


def test_encoder_attribute_use_reads_every_source_in_catalog_order_and_names_a_missing_row(tmp_path):
    import datasets

    use = load("encoder_attribute_use")
    ds = datasets.Dataset.from_dict(
        {
            "listing_id": ["a", "b"],
            "attributes": [{"color": "Red"}, {}],
            "true_attributes": [{"color": "red", "size": "M"}, {"color": "blue"}],
        }
    )
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"listing_id": "b", "sft_attributes": "Color: Blue", "rar_attributes": "garbage"},
        {"listing_id": "a", "sft_attributes": "size: m; color: red", "rar_attributes": ""},
    ]
    (run / "attributes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sources = use.attribute_sources(ds, [str(run / "attributes.jsonl")])
    run_name = str(run)  # outside outputs/: the whole path names the run
    assert list(sources) == ["none", "teacher", "true", f"{run_name}/sft_attributes", f"{run_name}/rar_attributes"]
    assert sources["none"] is None
    assert sources["teacher"] == ["color: red", ""]
    assert sources["true"] == ["color: red; size: m", "color: blue"]
    assert sources[f"{run_name}/sft_attributes"] == ["color: red; size: m", "color: blue"]  # by id, canonical order
    assert sources[f"{run_name}/rar_attributes"] == [None, None]  # nothing parsable: no attribute text
    only = use.attribute_sources(ds, [str(run / "attributes.jsonl")], columns=["rar_attributes"])
    assert list(only) == ["none", "teacher", "true", f"{run_name}/rar_attributes"]
    with pytest.raises(ValueError, match="given twice"):
        use.attribute_sources(ds, [str(run / "attributes.jsonl")] * 2)
    (run / "attributes.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="no row for listing 'a'"):
        use.attribute_sources(ds, [str(run / "attributes.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        use.main(["--catalog", "x", "--group", "AGCL", str(tmp_path)])  # not a saved encoder: named before loading
    assert exit_info.value.code == 2


def test_a_world_ladder_moves_the_catalog_with_the_seed_and_resumes_a_killed_seed(ladder, tmp_path):
    """``--world``: each seed's stages read that seed's catalog and the given configs; a seed killed after its RAR
    stage reruns only what is left (each stage's done file is its output)."""
    tasks = {s: ladder.seed_tasks(s, tmp_path / f"seed{s}", f"cat-{s}", False, False, "s1.yaml", "rar.yaml", True)
             for s in (0, 1)}  # fmt: skip
    for seed, groups in tasks.items():
        flat = [t for group in groups.values() for t in group]
        for t in flat:
            if "agcl_train.py" in " ".join(t.cmd) or "rar_grpo.py" in " ".join(t.cmd):
                assert t.cmd[t.cmd.index("--config") + 1] in ("s1.yaml", "rar.yaml")
                assert f"cat-{seed}" in t.cmd and str(seed) == t.cmd[t.cmd.index("--seed") + 1]
            if "cit.py" in " ".join(t.cmd):  # the round re-annotates this seed's world and trains with its stage 1
                assert t.cmd[t.cmd.index("--catalog") + 1] == f"cat-{seed}"
                assert t.cmd[t.cmd.index("--agcl_config") + 1] == "s1.yaml"
    evaluate = tasks[0]["evaluate"][0].cmd  # the evaluation child starts and imports (as a module, from the root)
    started = subprocess.run(
        [*evaluate[: evaluate.index("--_evaluate")], "--help"], cwd=ladder.ROOT, capture_output=True
    )
    assert started.returncode == 0, started.stderr.decode()[-500:]
    killed = tasks[0]
    for t in (*killed["chain"][:2], *killed["others"]):  # AGCL, RAR and InfoNCE had finished
        t.done.parent.mkdir(parents=True, exist_ok=True)
        t.done.write_text("done")

    def finish(done):  # a stage that only leaves its done file
        return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(done)!r}); "
                "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('x')"]  # fmt: skip

    fake = [ladder.Task(t.name, finish(t.done), t.done, t.deps) for group in killed.values() for t in group]
    before = {t.name for t in fake if t.done.is_file()}
    (tmp_path / "logs").mkdir()
    ladder.schedule(fake, 2, tmp_path / "logs", time.time())
    ran = sorted(p.name.removesuffix(".log") for p in (tmp_path / "logs").iterdir())
    assert ran == ["seed0-cit", "seed0-evaluate"] and before == {"seed0/agcl", "seed0/rar", "seed0/infonce"}


def test_encoder_line_form_reads_lines_canonically_drops_keys_and_names_a_missing_listing(tmp_path):
    from experiments.encoder_line_form import sources_of

    path = tmp_path / "attributes.jsonl"
    rows = [{"listing_id": "a", "sft": "Color: Red; shipping: free;; ", "rar": "color: red"},
            {"listing_id": "b", "sft": "nothing to read", "rar": "shipping: fast"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = sources_of(str(path), ["b", "a"], ["shipping"])
    assert list(out) == ["sft", "sft − shipping", "rar", "rar − shipping"]
    assert out["sft"] == [None, "color: red; shipping: free"] and out["sft − shipping"] == [None, "color: red"]
    assert out["rar − shipping"] == [None, "color: red"]  # a line of dropped keys only is no line
    with pytest.raises(SystemExit, match="listing 'c'"):
        sources_of(str(path), ["a", "c"], [])


def test_rar_seeds_logs_a_seed_and_reads_a_finished_one_back(monkeypatch, tmp_path):
    """experiments.rar_seeds: a seed's recipe output goes to its train.log (a long seed can be followed), and a seed
    whose directory holds the metrics of the same command is read back, not rerun (a killed run loses one seed)."""
    from experiments import rar_seeds

    calls = []

    def fake_run(cmd, check, stdout):
        calls.append(cmd)
        stdout.write("step 1 of 1\n")
        out = Path(cmd[cmd.index("--output_dir") + 1])
        (out / "metrics.json").write_text(json.dumps({"rar_attributes": {"recall@1": 0.5}}))

    monkeypatch.setattr(rar_seeds.subprocess, "run", fake_run)
    first = rar_seeds.run_seed(3, tmp_path / "demo", tmp_path / "seed3")
    assert first == {"rar_attributes": {"recall@1": 0.5}} and len(calls) == 1
    assert (tmp_path / "seed3" / "train.log").read_text() == "step 1 of 1\n"
    assert rar_seeds.run_seed(3, tmp_path / "demo", tmp_path / "seed3") == first and len(calls) == 1  # read back
    rar_seeds.run_seed(3, tmp_path / "demo", tmp_path / "seed3", extra=["--max_steps", "2"])  # another command
    assert len(calls) == 2


def stub_ladder_and_runner(rar_seeds, monkeypatch, tmp_path, faithful: dict, rar_r1):
    """A ladder dir whose seeds have their stages and a faithful RAR rung (R@1 ``faithful[seed]``), and a runner
    whose GRPO runs only write metrics (RAR R@1 ``rar_r1(seed)``, SFT 0.4); returns the dir and the commands run."""
    ladder = tmp_path / "ladder"
    for seed, r1 in faithful.items():
        (ladder / f"seed{seed}" / "agcl").mkdir(parents=True)
        (ladder / f"seed{seed}" / "agcl" / "encoder_config.json").write_text("{}")
        (ladder / f"seed{seed}" / "rar" / "sft").mkdir(parents=True)
        (ladder / f"seed{seed}" / "rar" / "sft" / "config.json").write_text("{}")
        metrics = {"rar_attributes": {"recall@1": r1}, "sft_attributes": {"recall@1": 0.4}}
        (ladder / f"seed{seed}" / "rar" / "metrics.json").write_text(json.dumps(metrics))
    calls = []

    def fake_run(cmd, check, stdout):
        calls.append(cmd)
        seed = int(cmd[cmd.index("--seed") + 1])
        metrics = {
            "no_attributes": {"recall@1": 0.2, "n_queries": 3000},
            "sft_attributes": {"recall@1": 0.4},
            "rar_attributes": {"recall@1": rar_r1(seed)},
        }
        (Path(cmd[cmd.index("--output_dir") + 1]) / "metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(rar_seeds.subprocess, "run", fake_run)
    monkeypatch.setattr(rar_seeds, "commit", lambda: "abc1234")
    monkeypatch.setattr(rar_seeds, "DATA", tmp_path / "data")
    monkeypatch.setattr(rar_seeds, "PAGE", tmp_path / "page.md")
    return ladder, calls


def test_rar_seeds_on_a_ladder_starts_each_seed_from_its_own_stages_and_pairs_the_rung(monkeypatch, tmp_path, capsys):
    """--ladder_dir: seed S runs from DIR/seedS/agcl and DIR/seedS/rar/sft on embedded:WORLD:S; the page pairs each
    seed with the ladder's faithful RAR rung; a seed the ladder has not finished is an error: line, exit 2."""
    from experiments import rar_seeds

    ladder, calls = stub_ladder_and_runner(
        rar_seeds, monkeypatch, tmp_path, {0: 0.40, 1: 0.44}, lambda s: 0.43 + 0.02 * s
    )
    argv = ["--ladder_dir", str(ladder), "--world", "paper", "--seeds", "0", "1", "--setting", "variant"]
    rar_seeds.main([*argv, "--output_dir", str(tmp_path / "runs"), "--", "--advantage_gate", "sft_likelihood"])
    for seed, cmd in zip((0, 1), sorted(calls, key=lambda c: c[c.index("--seed") + 1]), strict=True):
        assert cmd[cmd.index("--encoder") + 1] == str(ladder / f"seed{seed}" / "agcl")
        assert cmd[cmd.index("--model_name_or_path") + 1] == str(ladder / f"seed{seed}" / "rar" / "sft")
        assert cmd[cmd.index("--catalog") + 1] == f"embedded:paper:{seed}"
        assert cmd[-2:] == ["--advantage_gate", "sft_likelihood"]
    record = json.loads((tmp_path / "data" / "variant.json").read_text())
    assert set(record["faithful_rar"]) == {"0", "1"}
    row = next(line for line in (tmp_path / "page.md").read_text().splitlines() if line.startswith("| variant"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[4].startswith("+4.0") and cells[6].startswith("+2.0")  # RAR − SFT: 3 and 5; − RAR: 3 and 1
    with pytest.raises(SystemExit) as info:
        rar_seeds.main(["--ladder_dir", str(ladder), "--seeds", "2"])
    assert info.value.code == 2 and "seed2" in capsys.readouterr().err
    # a run whose SFT row differs from its rung's was not paired with it (another catalog or encoder): no record
    metrics = {"rar_attributes": {"recall@1": 0.40}, "sft_attributes": {"recall@1": 0.41}}
    (ladder / "seed0" / "rar" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit) as info:
        rar_seeds.main([*argv[:4], "--seeds", "0", "--setting", "unpaired", "--output_dir", str(tmp_path / "runs")])
    assert info.value.code == 2 and "not paired" in capsys.readouterr().err
    assert not (tmp_path / "data" / "unpaired.json").exists()


def test_rar_seeds_adds_seeds_to_an_earlier_sessions_record(monkeypatch, tmp_path, capsys):
    """--add_seeds keeps the seeds a setting's record holds (their run directories gone) and adds these; another
    command, or a seed recorded already, is an error line before anything runs."""
    from experiments import rar_seeds

    ladder, commands = stub_ladder_and_runner(
        rar_seeds, monkeypatch, tmp_path, dict.fromkeys((0, 1, 2), 0.41), lambda s: 0.42 + 0.01 * s
    )

    def ran():  # the seeds GRPO ran for, in order
        return sorted(int(c[c.index("--seed") + 1]) for c in commands)

    head = ["--ladder_dir", str(ladder), "--world", "paper", "--setting", "v", "--output_dir", str(tmp_path / "runs")]
    rar_seeds.main(["--seeds", "0", "1", *head, "--", "--beta", "0.04"])
    first = json.loads((tmp_path / "data" / "v.json").read_text())
    shutil.rmtree(tmp_path / "runs")  # the next session's checkout has no run directories
    for argv, why in (
        (["--seeds", "2", *head, "--add_seeds", "--", "--beta", "0.1"], "another command"),
        (["--seeds", "1", "2", *head, "--add_seeds", "--", "--beta", "0.04"], "recorded already"),
    ):
        with pytest.raises(SystemExit) as info:
            rar_seeds.main(argv)
        assert info.value.code == 2 and why in capsys.readouterr().err
    assert ran() == [0, 1]  # nothing ran for the refused commands
    rar_seeds.main(["--seeds", "2", "--jobs", "1", *head, "--add_seeds", "--", "--beta", "0.04"])
    record = json.loads((tmp_path / "data" / "v.json").read_text())
    assert ran() == [0, 1, 2] and list(record["seeds"]) == ["0", "1", "2"]
    assert record["seeds"]["0"] == first["seeds"]["0"] and list(record["faithful_rar"]) == ["0", "1", "2"]
    assert [part["seeds"] for part in record["parts"]] == [[0, 1], [2]]
    assert record["command"].startswith("python -m experiments.rar_seeds --seeds 0 1 2 --ladder_dir")
    assert "--add_seeds" not in record["command"] and record["command"].endswith("-- --beta 0.04")
    row = next(line for line in (tmp_path / "page.md").read_text().splitlines() if line.startswith("| v "))
    assert "+2.0 / +3.0 / +4.0" in row  # RAR − SFT per seed, in seed order


def test_ladder_report_merges_the_json_of_several_sessions(ladder, tmp_path, capsys):
    """--report_from A B: the seeds of both files on one page and in one JSON beside it; a seed in both is an error."""

    def rungs(r1):
        metrics = {
            "instance": {"recall@1": r1, "recall@5": 0.8, "recall@10": 0.9, "mAP@10": 0.4, "n_queries": 3000},
            "instance_plain_gallery": {"recall@1": r1},
            "coarse": {"mAP@1": 0.9},
            "image_to_text": {"recall@1": 0.1},
            "text_to_image": {"recall@1": 0.1},
        }
        return {rung: json.loads(json.dumps(metrics)) for rung in [*ladder.RUNGS, "InfoNCE", "AGCL"]}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"seeds": {"0": rungs(0.4), "1": rungs(0.5)}, "machine": "box", "seconds": 60}))
    second.write_text(json.dumps({"seeds": {"2": rungs(0.6)}, "machine": "other box", "seconds": 30}))
    out = tmp_path / "ladder_paper.md"
    flags = ["--stage1_ablation", "false", "--output", str(out)]
    ladder.main(["--report_from", str(first), str(second), *flags])
    merged = json.loads(out.with_suffix(".json").read_text())
    assert list(merged["seeds"]) == ["0", "1", "2"] and merged["seconds"] == 90
    assert merged["machine"] == "box; other box" and "--seeds 0 1 2" in out.read_text()
    with pytest.raises(SystemExit) as info:
        ladder.main(["--report_from", str(first), str(out.with_suffix(".json")), *flags])
    assert info.value.code == 2 and "seed 0 is in two files" in capsys.readouterr().err


def test_encoder_line_form_names_a_missing_catalog_column(small_catalog_dir, capsys):
    from experiments.encoder_line_form import main

    with pytest.raises(SystemExit) as info:
        main(["--catalog", str(small_catalog_dir), "--encoders", "unused", "--columns", "true_attributes", "shade"])
    assert "error: --columns 'shade'" in str(info.value)
    with pytest.raises(SystemExit) as info:
        main(["--catalog", str(small_catalog_dir), "--encoders", "unused"])
    assert info.value.code == 2 and "--columns" in capsys.readouterr().err


def test_a_seed_is_also_evaluated_against_the_teachers_gallery(ladder, tiny_encoder_dir, small_catalog_dir, tmp_path):
    """The reward's protocol beside the two others: queries as each rung writes them, gallery the teacher's lines.
    With SFT lines equal to the teacher's it is the both-sides figure; with no RAR line it is the AGCL rung's."""
    import shutil

    from afmrl.attributes import format_attributes
    from afmrl.catalog import load_catalog

    work = tmp_path / "seed0"
    for folder in ("infonce", "agcl", "cit/encoder"):
        shutil.copytree(tiny_encoder_dir, work / folder)
    test = load_catalog(small_catalog_dir, split="test", verify_images=False)
    rows = [{"listing_id": lid, "sft_attributes": format_attributes(a), "rar_attributes": ""}
            for lid, a in zip(test["listing_id"], test["attributes"], strict=True)]  # fmt: skip
    (work / "rar").mkdir()
    (work / "rar" / "attributes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = ladder.evaluate_seed(work, str(small_catalog_dir))
    assert all("instance_teacher_gallery" in results[rung] for rung in ladder.RUNGS)
    sft, rar, agcl = (results[r]["instance_teacher_gallery"] for r in ladder.RUNGS[2:4] + ladder.RUNGS[1:2])
    assert sft["recall@1"] == pytest.approx(results[ladder.RUNGS[2]]["instance"]["recall@1"])
    assert rar["recall@1"] == pytest.approx(agcl["recall@1"]) and rar["mrr"] == pytest.approx(agcl["mrr"])


def test_ladder_refuses_a_config_whose_local_base_model_is_missing(ladder, tmp_path, capsys):
    """A world's generator base is built by its own command: a missing one is an error line before stage 1 runs,
    not a failure of the RAR stage half an hour later. Hub ids and the shipped tiny names pass."""
    config = tmp_path / "rar.yaml"
    config.write_text(f"model_name_or_path: {tmp_path}/no/base\nencoder_model_name_or_path: pretrained-tiny-qwen2-vl\n")
    with pytest.raises(SystemExit) as info:
        ladder.main(["--seeds", "0", "--rar_config", str(config), "--work_dir", str(tmp_path / "work")])
    assert info.value.code == 2 and f"model_name_or_path {tmp_path}/no/base does not exist" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    config.write_text("model_name_or_path: Qwen/Qwen2-VL-2B-Instruct\n")
    ladder.check_local_models(str(config))
    (tmp_path / "no" / "base").mkdir(parents=True)
    config.write_text(f"model_name_or_path: {tmp_path}/no/base\n")
    ladder.check_local_models(str(config))


def test_agcl_ablation_resumes_each_variant_and_pairs_seeds_with_intervals(tmp_path, monkeypatch):
    """A finished variant is reused (seeds run in separate processes, one last command writes the page); the halves
    train first; each variant's delta to InfoNCE is paired per seed with its interval."""
    ablation = load("agcl_ablation")
    calls = []
    recall = {"InfoNCE": 0.20, "+ weighting": 0.22, "+ filtering": 0.17, "AGCL (both)": 0.19}

    def fake_run(flags, seed, extra, output_dir, config):
        name = next(n for n, f in ablation.VARIANTS.items() if f == flags)
        calls.append((seed, name, extra))
        Path(output_dir).mkdir(parents=True)
        metrics = {"recall@1": recall[name] + seed / 100, "recall@5": 0.5, "recall@10": 0.6, "mAP@10": 0.3}
        return {"instance": metrics, "instance_teacher_gallery": {"recall@1": recall[name] / 2}}, [1.0, 0.1, 0.1]

    monkeypatch.setattr(ablation, "run", fake_run)
    common = ["--world", "paper", "--work_dir", str(tmp_path / "w")]
    for seed in ("3", "4"):
        ablation.main(["--seeds", seed, *common, "--output", str(tmp_path / f"s{seed}.md")])
    assert [name for _, name, _ in calls[:4]] == ablation.RUN_ORDER  # the two halves first
    assert calls[0][2] == ["--catalog", "embedded:paper:3"] and calls[4][2] == ["--catalog", "embedded:paper:4"]
    ablation.main(["--seeds", "3", "4", *common, "--output", str(tmp_path / "page.md")])
    assert len(calls) == 8  # the page came from the saved figures: nothing retrained
    page = (tmp_path / "page.md").read_text()
    assert "| + filtering |" in page and "-3.0 / -3.0 | -3.0 ± 0.0 (95% CI -3.0 to -3.0, n = 2)" in page
    assert "teacher's lines" in page and "| + weighting | 11.0 ± 0.0 | +1.0 / +1.0 |" in page
    summary = json.loads((tmp_path / "page.json").read_text())
    assert summary["+ weighting"]["delta_recall@1"] == pytest.approx([2.0, 2.0])
    with pytest.raises(SystemExit):  # the world names every seed's catalog
        ablation.main(["--seeds", "3", *common, "--catalog", "x"])
    with pytest.raises(SystemExit, match="another command"):  # other flags never reuse these figures
        ablation.main(["--seeds", "3", *common, "--num_train_epochs", "1", "--output", str(tmp_path / "x.md")])
    assert len(calls) == 8


def test_agcl_ablation_variants_trains_only_those_named_and_keeps_infonce(tmp_path, monkeypatch):
    """--variants InfoNCE 'AGCL (both)': two runs a seed, a page with those two rows; without InfoNCE, an error."""
    ablation = load("agcl_ablation")
    calls = []

    def fake_run(flags, seed, extra, output_dir, config):
        name = next(n for n, f in ablation.VARIANTS.items() if f == flags)
        calls.append((seed, name))
        Path(output_dir).mkdir(parents=True)
        r1 = {"InfoNCE": 0.20, "AGCL (both)": 0.23}[name] + seed / 100
        return {"instance": {"recall@1": r1, "recall@5": 0.5, "recall@10": 0.6, "mAP@10": 0.3}}, [1.0, 0.1]

    monkeypatch.setattr(ablation, "run", fake_run)
    argv = ["--seeds", "5", "6", "--catalog", "embedded:paper:3", "--work_dir", str(tmp_path / "w")]
    ablation.main([*argv, "--variants", "InfoNCE", "AGCL (both)", "--output", str(tmp_path / "p.md")])
    assert calls == [(5, "InfoNCE"), (5, "AGCL (both)"), (6, "InfoNCE"), (6, "AGCL (both)")]
    page = (tmp_path / "p.md").read_text()
    assert "--variants InfoNCE 'AGCL (both)'" in page and "| + weighting |" not in page
    assert "| AGCL (both) |" in page and "+3.0 / +3.0" in page
    with pytest.raises(SystemExit):
        ablation.main([*argv, "--variants", "AGCL (both)", "--output", str(tmp_path / "q.md")])
