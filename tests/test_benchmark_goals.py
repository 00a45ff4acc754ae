"""benchmarks/goals.py's table logic (benchmarks/_goal_table.py) on made-up measurements: no benchmark runs.

The goal table decides "met" from each goal's bound, so a wrong comparison or a figure read from the wrong
side would print a false "yes" in the issue's table; here every figure is drawn at random on either side of
its bound and the verdict is checked against a comparison written out in the test.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _goal_table as table  # benchmarks/ is not a package: imported from its folder

sys.path.remove(str(BENCHMARKS))


def side(rng, seconds, rel_err=None):
    record = {"seconds": seconds, "peak_rss_gib": float(rng.uniform(0.1, 8.0)),
              "loadavg": [float(rng.uniform(0, 9)), float(rng.uniform(0, 9))]}
    if rel_err is not None:
        record["rel_err"] = rel_err
    return record


def measurements(rng, ratios, errors):
    """Every part, with npdiff/torch time ratios and errors as given and the other figures random."""
    models = {}
    for component in table.NETWORKS:
        torch_seconds = float(rng.uniform(0.1, 20.0))
        openvino_f32 = torch_seconds * float(rng.uniform(0.5, 1.0))
        models[component] = {
            "torch": side(rng, torch_seconds),
            "npdiff": side(rng, torch_seconds * ratios[component], errors[component]),
            "npdiff_bf16": side(rng, torch_seconds * ratios[component + "_bf16"], errors[component + "_bf16"]),
            "openvino_convert": {"convert_seconds": 60.0, "loadavg": [1.0, 1.0]},
            "openvino_f32": side(rng, openvino_f32, 1e-6),
            "openvino_bf16": side(rng, openvino_f32 / 2, 2e-2),
        }
    job = {"npdiff": {"wall_s": 50.0 * ratios["wall"], "peak_rss_gib": 5.0 * ratios["rss"], "loadavg": [1, 2]},
           "diffusers": {"wall_s": 50.0, "peak_rss_gib": 5.0, "loadavg": [2, 3]},
           "max_pixel_diff": int(rng.integers(0, 4))}
    tiled = {"size": 768, "npdiff": {"decode_s": 30.0, "peak_rss_gib": 1.0, "loadavg": [1, 1]},
             "torch": {"decode_s": 60.0, "peak_rss_gib": 2.0, "loadavg": [1, 1]}, "max_pixel_diff": int(rng.integers(0, 5))}
    large = {"size": 2048, "npdiff": {"decode_s": 300.0, "peak_rss_gib": float(rng.uniform(0.5, 6.0)), "loadavg": [1, 1]}}
    colours = {"right": int(rng.integers(8, 13)), "of": 12, "seed": 5, "loadavg": [1, 1]}
    return {"models": models, "pipeline": job, "tiled": tiled, "large": large, "colours": colours}


def random_case(rng):
    ratios = {key: float(rng.uniform(0.2, 1.2)) for key in
              ("unet", "vae_decode", "text_encoder", "unet_bf16", "vae_decode_bf16", "text_encoder_bf16", "wall", "rss")}
    errors = {"unet": 10 ** float(rng.uniform(-7, -3)), "vae_decode": 10 ** float(rng.uniform(-7, -3)),
              "text_encoder": 10 ** float(rng.uniform(-7, -3)), "unet_bf16": float(rng.uniform(0, 0.06)),
              "vae_decode_bf16": float(rng.uniform(0, 0.06)), "text_encoder_bf16": float(rng.uniform(0, 0.06))}
    return ratios, errors, measurements(rng, ratios, errors)


def verdicts(rows):
    return {row["goal"]: row["met"] for row in rows}


def test_every_goal_is_met_exactly_when_its_figure_is_within_the_bound(rng):
    for _ in range(20):
        ratios, errors, m = random_case(rng)
        models = m["models"]
        expected = {
            "float32 UNet time / torch float32": ratios["unet"] <= 0.70,
            "float32 UNet time / OpenVINO f32 (ahead of it)":
                models["unet"]["npdiff"]["seconds"] < models["unet"]["openvino_f32"]["seconds"],
            "float32 VAE decode time / torch float32": ratios["vae_decode"] <= 0.45,
            "float32 CLIP text encoder time / torch float32": ratios["text_encoder"] <= 0.80,
            "float32 networks' relative error against torch (worst)":
                max(errors["unet"], errors["vae_decode"], errors["text_encoder"]) <= 1e-4,
            "whole 512x512 job (4 PNDM steps) wall / diffusers": ratios["wall"] <= 0.60,
            "whole 512x512 job peak RSS / diffusers": ratios["rss"] <= 0.60,
            "whole 512x512 job: same picture (8-bit levels)": m["pipeline"]["max_pixel_diff"] <= 1,
            "bf16 UNet time / torch float32": ratios["unet_bf16"] <= 0.45,
            "bf16 UNet relative error against torch float32": errors["unet_bf16"] <= 3e-2,
            "bf16 VAE decode time / torch float32": ratios["vae_decode_bf16"] <= 0.45,
            "bf16 VAE decode relative error against torch float32": errors["vae_decode_bf16"] <= 3e-2,
            "shipped model at bf16: prompts drawn in the named colours": m["colours"]["right"] >= 11,
            "tiled decode against diffusers' tiled decode (8-bit levels)": m["tiled"]["max_pixel_diff"] <= 2,
            "2048x2048 tiled decode peak RSS (GiB)": m["large"]["npdiff"]["peak_rss_gib"] <= 3.0,
        }
        got = verdicts(table.goal_rows(m))
        for goal, met in expected.items():
            assert got[goal] == ("yes" if met else "**no**"), (goal, m)
        beside = [goal.what for goal in table.GOALS if goal.bound is None]
        assert beside and all(got[name] == "(beside)" for name in beside)


def test_a_figure_not_measured_says_so_instead_of_failing(rng):
    _, _, m = random_case(rng)
    del m["pipeline"]["diffusers"]                          # a side that failed
    m["models"]["unet"]["npdiff_bf16"] = {"error": "worker failed (exit status 1)", "loadavg": [1, 1]}
    del m["tiled"]                                          # a part left out
    got = verdicts(table.goal_rows(m))
    for goal in ("whole 512x512 job (4 PNDM steps) wall / diffusers", "bf16 UNet time / torch float32",
                 "bf16 UNet relative error against torch float32",
                 "tiled decode against diffusers' tiled decode (8-bit levels)"):
        assert got[goal] == "not measured"
    assert got["float32 UNet time / torch float32"] in ("yes", "**no**")
    assert set(verdicts(table.goal_rows({})).values()) == {"not measured"}


def test_network_rows_give_each_side_against_torch(rng):
    _, _, m = random_case(rng)
    m["models"]["unet"]["openvino_bf16"] = {"unsupported": "this CPU has no bf16 support in OpenVINO"}
    rows = table.network_rows(m)
    assert len(rows) == 3 * 5  # three networks x five sides; the conversion's record is left out
    by_key = {(row["network"], row["side"]): row for row in rows}
    for component, sides in m["models"].items():
        torch_seconds = sides["torch"]["seconds"]
        row = by_key[(table.NETWORKS[component], "npdiff bf16")]
        assert row["ratio"] == f"{sides['npdiff_bf16']['seconds'] / torch_seconds:.2f}"
        assert row["rel_err"] == f"{sides['npdiff_bf16']['rel_err']:.1e}"
        assert by_key[(table.NETWORKS[component], "torch float32")]["rel_err"] == "-"
    assert by_key[(table.NETWORKS["unet"], "OpenVINO bf16")]["note"] == "this CPU has no bf16 support in OpenVINO"


def test_markdown_table_and_load_text(rng):
    rows = table.goal_rows(random_case(rng)[2])
    text = table.markdown_table(rows, table.GOAL_COLUMNS).splitlines()
    assert len(text) == len(rows) + 2
    assert all(line.count("|") == len(table.GOAL_COLUMNS) + 1 for line in text)
    assert table.loadavg_text([{"loadavg": [2.0, 6.25]}, {"loadavg": [3.0, 3.5]}]) == "2.0-6.2"
    assert table.loadavg_text([{"loadavg": [4.0, 4.01]}]) == "4.0"
    assert table.loadavg_text([{}]) == "-"


@pytest.mark.parametrize("arguments, message", [
    (["--parts", "models,bogus"], "--parts takes models, pipeline, tiled, large, colours"),
    (["--parts", ""], "--parts takes models, pipeline, tiled, large, colours"),  # made 4.3 GB, then measured nothing
    (["--parts", ","], "--parts takes models, pipeline, tiled, large, colours"),
    (["--repeat", "0"], "--repeat must be >= 1, got 0"),
    (["--parts", "models", "--cache", "/dev/null"], "--cache /dev/null is not a folder"),  # was a traceback
])
def test_goals_command_refuses_bad_arguments_before_measuring(arguments, message, tmp_path):
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "goals.py"), *arguments],
                               check=False, capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, NPDIFF_CACHE=str(tmp_path), XDG_CACHE_HOME=str(tmp_path)))
    assert completed.returncode != 0
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not list(tmp_path.iterdir())  # nothing made in the cache folder
