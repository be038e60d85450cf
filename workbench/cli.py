"""Command line: `python -m workbench <command>`. Errors print one clear line, never a stack trace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InvalidInput, WorkbenchError


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate images and save them as PNGs with metadata")
    parser.add_argument("--model", default=None, help="registry name (shapes, sd15, sd21, sdxl), folder or hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, action="append", help="repeat for several images (default 0)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scheduler", default="default")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from .generation import GenerationRequest, LoraSpec, generate

    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt,
                                seeds=args.seed or [0], steps=args.steps, guidance=args.guidance,
                                width=args.width, height=args.height, batch_size=args.batch_size,
                                scheduler=args.scheduler, loras=[LoraSpec.parse(text) for text in args.lora])
    if args.model:
        request.model = args.model
    started = time.time()
    try:
        results = generate(request, out_dir=args.out)
    except KeyboardInterrupt:  # each image is saved as it is made: say which ones are there
        saved = sorted(path for path in Path(args.out).glob("*.png") if path.stat().st_mtime >= started)
        for path in saved:
            print(path)
        print(f"interrupted: {len(saved)} image(s) saved before the stop (listed above)", file=sys.stderr)
        return 130
    for result in results:
        print(result.path)
    return 0


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score a model on ShapesBench or any GenEval-format prompt file")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    parser.add_argument("--prompts", default=None, help="GenEval evaluation_metadata.jsonl (default: ShapesBench)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start the seeds here instead of 0 (e.g. 4: seeds 4..7, images the runs' own "
                             "evaluations never drew)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--detector", default=None, help="detector backend (default: the model's world)")
    parser.add_argument("--clip-score", action="store_true",
                        help="also CLIPScore every image against its prompt (CLIP from $WORKBENCH_CLIP_MODEL)")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .benchmark import SHAPESBENCH, BenchmarkConfig, format_scores, run_benchmark
    from .generation import LoraSpec

    config = BenchmarkConfig(model=args.model, loras=[LoraSpec.parse(text) for text in args.lora],
                             prompts=args.prompts or str(SHAPESBENCH), seeds=args.seeds, first_seed=args.first_seed,
                             steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                             detector=args.detector)
    if args.clip_score:
        from .clipscore import METRIC as CLIPSCORE_METRIC
        from .perception.clip_metrics import check_clip

        check_clip(metric=CLIPSCORE_METRIC)  # a missing CLIP fails now, not after every image is drawn
    _check_eval_folder(args.out, config.to_dict())
    try:
        summary = run_benchmark(config, args.out)
    except KeyboardInterrupt:
        print(f"interrupted: an evaluation is written when every image is scored, so nothing of this one is kept "
              f"in {args.out}; run the same command again", file=sys.stderr)
        return 130
    print(format_scores(summary))
    print(f"wrote {args.out / 'scores.json'} and {args.out / 'verdicts.csv'}")
    if args.clip_score:
        from .clipscore import clip_score_for_run

        clip = clip_score_for_run(args.out)
        per_tag = ", ".join(f"{tag} {value['mean']:.1f}" for tag, value in clip["per_tag"].items())
        print(f"CLIPScore (100*max(cos, 0), {clip['model']}): mean {clip['mean']:.2f}; {per_tag}")
        print(f"wrote {args.out / 'clipscore.json'}")
    return 0


def _check_eval_folder(out: Path, settings: dict) -> None:
    """Refuse a folder holding a run, or an evaluation with other settings (its images would stay beside the
    new ones, and its scores be replaced without a word); the same evaluation again may overwrite itself."""
    from .store import refuse_run_folder

    refuse_run_folder(out, "the evaluation")
    scores = out / "scores.json"
    if not scores.is_file():
        return
    try:
        saved = json.loads(scores.read_text()).get("config", {})
    except (ValueError, AttributeError):
        saved = None
    differing = sorted(key for key in settings if not isinstance(saved, dict) or saved.get(key) != settings[key])
    if differing:
        raise InvalidInput(f"{out} holds an evaluation with other settings ({', '.join(differing)}); give a new "
                           f"folder, or the same settings to redo it.")


def _vocabulary(args):
    from .prompt_parser import default_vocabulary

    return default_vocabulary().extend(args.add_class) if args.add_class else None


def _add_parse(subparsers) -> None:
    parser = subparsers.add_parser("parse", help="read a prompt into a GenEval-style scene spec (JSON)")
    parser.add_argument("prompt")
    parser.add_argument("--add-class", action="append", default=[], metavar="NAME",
                        help="a class the default vocabulary (shapes and COCO's 80) lacks; repeat for more")
    parser.set_defaults(run=_run_parse)


def _run_parse(args) -> int:
    from .prompt_parser import parse_prompt

    spec = parse_prompt(args.prompt, _vocabulary(args))
    print(json.dumps(spec, indent=2))
    if not spec["include"] and not spec.get("exclude"):
        # Not an error (an empty scene is what the prompt asks for), but easy to miss in the JSON.
        print("note: the prompt names no object the vocabulary knows (the shapes world and COCO's 80 classes); "
              "add one with --add-class NAME", file=sys.stderr)
    return 0


def _add_relabel(subparsers) -> None:
    parser = subparsers.add_parser("relabel", help="rewrite a prompt to what an image's detections show (IPR)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--detections", type=Path, required=True, metavar="FILE.json",
                        help='JSON list of {"label", "box": [x0, y0, x1, y1] in pixels, "score", "color"?}')
    parser.add_argument("--width", type=int, required=True, help="image width in pixels")
    parser.add_argument("--height", type=int, required=True, help="image height in pixels")
    parser.add_argument("--box-threshold", type=float, default=0.3, help="drop detections scoring at or below this")
    parser.add_argument("--split-colors", action="store_true",
                        help="write a class of mixed colours as one clause per colour (GenEval's scorer cannot check that)")
    parser.add_argument("--say-relations", action="store_true",
                        help="when the relabel names two single objects, say where one is relative to the other")
    parser.add_argument("--keep-framing", action="store_true",
                        help="write the rewrite inside the prompt's own framing ('a photo of ...'), as IPR's "
                             "--keep-framing does")
    parser.add_argument("--add-class", action="append", default=[], metavar="NAME",
                        help="a class the default vocabulary lacks; repeat for more")
    parser.set_defaults(run=_run_relabel)


def _run_relabel(args) -> int:
    from .relabel import load_detections, relabel

    result = relabel(args.prompt, load_detections(args.detections), args.width, args.height,
                     box_threshold=args.box_threshold, vocabulary=_vocabulary(args), split_colors=args.split_colors,
                     say_relations=args.say_relations, keep_framing=args.keep_framing)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write a self-contained HTML report of a comparison, eval or IPR run")
    parser.add_argument("run_id", metavar="RUN_OR_EVAL_ID", help="a folder, or the name of a run under the data folder's runs/")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--max-side", type=int, default=256, help="shrink larger images to this many pixels (0: keep)")
    parser.add_argument("--per-tag", type=int, default=None, help="show only the first N prompts of each tag in the grid")
    parser.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from .report import write_report

    out = write_report(args.run_id, args.out, max_side=args.max_side or None, per_tag=args.per_tag)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _add_diff(subparsers) -> None:
    parser = subparsers.add_parser(
        "diff", help="how sure a difference in accuracy is: paired 95%% CIs and p-values of two evaluations")
    parser.add_argument("first", metavar="BASE", help="an evaluation folder; or a comparison or IPR run alone, "
                        "whose variants or iterations are then each compared with its first")
    parser.add_argument("second", metavar="OTHER", nargs="?", default=None,
                        help="an evaluation of the same prompts and seeds")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap and sign-flip draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=_run_diff)


def _run_diff(args) -> int:
    from .report import load_comparison, resolve_folder
    from .significance import against_first, format_differences

    first = load_comparison(resolve_folder(args.first))
    if args.second is None:
        variants, rows = first["variants"], first["rows"]
        if len(variants) < 2:
            raise InvalidInput(f"{args.first} holds one evaluation: give a second one to compare it with")
    else:
        second = load_comparison(resolve_folder(args.second))
        variants = [first["variants"][0], second["variants"][0]]
        rows = ([row for row in first["rows"] if row["variant"] == 0] +
                [{**row, "variant": 1} for row in second["rows"] if row["variant"] == 0])
        if variants[0]["label"] == variants[1]["label"]:
            variants[1] = {**variants[1], "label": Path(args.second).name or "other"}
    results = against_first(variants, rows, resamples=args.resamples, seed=args.seed)
    if args.json:
        print(json.dumps([{"base": variants[0]["label"], "other": label, "differences": [d.to_dict() for d in diffs]}
                          for label, diffs in results], indent=2))
        return 0
    for label, diffs in results:
        print(f"{label} minus {variants[0]['label']} (accuracy %, difference in points; CI: prompt-clustered "
              f"bootstrap; p: paired sign-flip test; {args.resamples} draws):")
        print(format_differences(diffs, variants[0]["label"], label))
        print()
    print("These intervals cover the evaluation's prompts and seeds, not the spread between training runs.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_eval(subparsers)
    _add_parse(subparsers)
    _add_relabel(subparsers)
    _add_report(subparsers)
    _add_diff(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
