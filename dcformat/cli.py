"""The ``dcz`` command line: a thin layer over :mod:`dcformat.api`."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from . import __version__
from .errors import DczError
from .select import KINDS, DEFAULT_MIN_ELEMENTS, Policy, parse_layer_rule, parse_per_kind

#: Exit codes: 1 for a bad input or file (a DczError or an OS error), 2 for usage errors (click's), 130 on Ctrl-C.
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
#: inspect shows this many of the largest tensors unless --all is given.
INSPECT_TOP = 40


class _Group(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DczError as exc:
            click.echo(f"dcz: error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except OSError as exc:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            click.echo(f"dcz: error: {exc.strerror or exc}{where}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("dcz: interrupted; no output was written", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dcz")
def main() -> None:
    """dcz: make ONNX models small enough to ship (Deep Compression: pruning, weight sharing, Huffman coding).

    \b
    dcz compress model.onnx            -> model.dcz
    dcz decompress model.dcz           -> model.onnx (runs in onnxruntime)
    dcz inspect model.dcz              where every byte went
    dcz compress m.onnx --target rel_l2=1e-2 --calibration x.npz   smallest file meeting a fidelity target
    dcz sensitivity model.onnx         which tensors matter
    dcz demo                           try it on a bundled LeNet and real MNIST digits
    """


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator:
    """A per-tensor progress bar on a terminal; nothing when piped or quiet."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.set_postfix_str(name[-30:], refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _policy(preset, quantizer, error, bits, index_bits, sparsity, quality, global_sparsity, init, layer, raw,
            min_elements, compress_norm, per_channel=False) -> Policy:
    kw = {}
    # --bits and --preset paper are k-means settings: they choose the k-means quantizer unless told otherwise.
    kw["quantizer"] = quantizer or ("kmeans" if bits or preset == "paper" else "uniform")
    if error:
        kw["rel_error"] = parse_per_kind(error, "--error")
    if bits:
        kw["bits"] = parse_per_kind(bits, "--bits")
    if index_bits:
        kw["index_bits"] = parse_per_kind(index_bits, "--index-bits")
    if sparsity:
        kw["sparsity"] = parse_per_kind(sparsity, "--sparsity")
    if quality:
        kw["quality"] = parse_per_kind(quality, "--quality")
    if init:
        kw["init"] = init
    kw.update(global_sparsity=global_sparsity, layers=tuple(parse_layer_rule(r) for r in layer), raw=tuple(raw),
              min_elements=min_elements, compress_norm=compress_norm, per_channel=per_channel)
    if preset == "paper":
        base = Policy.paper()
        kw.setdefault("bits", base.bits)
        kw.setdefault("index_bits", base.index_bits)
    return Policy(**kw)


def _fidelity_table(rows) -> str:
    lines = [f"{'output':<24} {'rel L2':>10} {'max abs':>10} {'cosine':>9} {'top-1 agree':>12}"]
    for r in rows:
        top1 = f"{r.top1_agreement:.2%}" if r.top1_agreement is not None else "-"
        lines.append(f"{r.name[:24]:<24} {r.rel_l2:>10.2e} {r.max_abs:>10.2e} {r.cosine:>9.6f} {top1:>12}")
    return "\n".join(lines)


KIND_HELP = f"Kinds: {', '.join(KINDS)}; '*' = every kind."


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output .dcz (default: MODEL with .dcz).")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--preset", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="'paper': Deep Compression's bit widths (conv 8-bit codes and indices, fc 5-bit).")
@click.option("--quantizer", type=click.Choice(["uniform", "kmeans", "eckmeans"]),
              help="uniform: a grid per tensor at --error (default). kmeans: the paper's 2^bits-entry codebooks "
                   "(default when --bits or --preset paper is given). eckmeans: entropy-constrained k-means started "
                   "from the --error grid (levels move and merge where that saves code length).")
@click.option("--error", metavar="E|KIND=E,...",
              help="Uniform grid: rounding error as a fraction of the RMS of each tensor's weakest output channel "
                   "(default 2.5e-3); larger is smaller and less exact.")
@click.option("--bits", metavar="B|KIND=B,...", help=f"k-means codebook bits: '8', or per op kind 'conv=8,fc=5'. {KIND_HELP}")
@click.option("--index-bits", metavar="B|KIND=B,...", help="Relative-index field width for sparse tensors (default 8).")
@click.option("--sparsity", metavar="S|KIND=S,...", help="Prune this fraction of each tensor by magnitude: '0.5' or 'conv=0.5,fc=0.9'.")
@click.option("--quality", metavar="Q|KIND=Q,...", help="Han et al.'s rule: prune |w| < Q x std(w) per tensor.")
@click.option("--global-sparsity", type=click.FloatRange(0, 1), help="Prune this fraction of all weights by one global magnitude threshold.")
@click.option("--init", type=click.Choice(["linear", "density", "random"]), help="k-means initialisation (default linear, the paper's).")
@click.option("--layer", multiple=True, metavar="PATTERN:KEY=V,...",
              help="Per-tensor settings by name pattern, e.g. 'conv1*:bits=6,sparsity=0.3' or 'head.*:raw'. Repeatable; later wins.")
@click.option("--raw", multiple=True, metavar="PATTERN", help="Store tensors matching this name pattern raw (bit-exact). Repeatable.")
@click.option("--min-elements", type=click.IntRange(0), default=DEFAULT_MIN_ELEMENTS, show_default=True,
              help="Tensors with fewer elements are stored raw.")
@click.option("--compress-norm", is_flag=True, help="Also compress normalisation parameters (raw by default).")
@click.option("--per-channel", is_flag=True, help="Uniform grid: one scale per output channel (fits BN-folded convs).")
@click.option("--target", metavar="METRIC=V",
              help="Choose per-tensor settings automatically: the smallest file whose outputs on the calibration inputs "
                   "meet rel_l2=V (every output), cosine=V, top1=V, or task=CHECK[,changes=V] (the same task answers, "
                   "but for a share V, default 0.01, of the calibration items and of new items as estimated; CHECK is "
                   "a kind such as ctc, classification, binary_map, heatmap_peaks, yolox, vad, pitch, or a public "
                   "model name); verified by decoding the file "
                   "and running it. E.g. --target rel_l2=1e-2, --target task=ctc,changes=0.05.")
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --target: a .npz of real inputs keyed by graph input name (default: random inputs, with a warning).")
@click.option("--check", is_flag=True, help="Run original and rebuilt model in onnxruntime and report the output error.")
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --check: a .npz of inputs keyed by graph input name (default: random inputs). "
                   "With --target: held-out inputs for the final check (default: the calibration inputs).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def compress(model, output, force, preset, quantizer, error, bits, index_bits, sparsity, quality, global_sparsity, init, layer, raw,
             min_elements, compress_norm, per_channel, target, calibration_path, check, inputs_path, as_json, quiet):
    """Compress an ONNX MODEL into a .dcz file.

    By default every float weight of at least --min-elements elements is rounded to a uniform grid whose
    error is 0.25% of the norm of each tensor's weakest channel, the levels used form its codebook, and the codes are entropy-coded;
    nothing is pruned: the rebuilt model gives the same answers. --error, --bits and pruning trade size for
    accuracy; check with --check, best on inputs of your own (--inputs).
    """
    from . import api

    policy = _policy(preset, quantizer, error, bits, index_bits, sparsity, quality, global_sparsity, init, layer, raw, min_elements,
                     compress_norm, per_channel)
    check_inputs = None
    if inputs_path is not None:
        from .fidelity import load_inputs

        check_inputs = load_inputs(inputs_path)
        check = True
    if calibration_path is not None and target is None:
        raise click.UsageError("--calibration is used by --target; give --target too (or --inputs for a check)")
    api.set_malloc_threshold()  # freed tensor-sized buffers go back to the system (see api.MALLOC_MMAP_THRESHOLD)
    t0 = time.perf_counter()
    alloc = None
    if target is not None:
        from . import allocate
        from .fidelity import load_inputs

        goal = allocate.Target.parse(target)
        if policy.quantizer != "uniform":
            raise click.UsageError("--target chooses uniform grids; it cannot be combined with --bits/--preset paper/--quantizer kmeans")
        calibration = load_inputs(calibration_path) if calibration_path is not None else None
        say = (lambda m: None) if quiet or as_json else (lambda m: click.echo(m, err=True))
        warn = lambda m: click.echo(f"dcz: warning: {m}", err=True)  # noqa: E731
        if calibration is None:
            from .onnx_ingest import load_model

            calibration = allocate.calibration_inputs(load_model(model, load_external=False), None, warn=warn)
        with _progress("compress", quiet or as_json) as progress:
            result, alloc, verified = allocate.compress_to_target(model, output, policy, goal, calibration, check_inputs=check_inputs,
                                                        overwrite=force, log=say, progress=progress)
    else:
        with _progress("compress", quiet or as_json) as progress:
            result = api.compress(model, output, policy, overwrite=force, check=check, check_inputs=check_inputs,
                                  progress=progress)
    seconds = time.perf_counter() - t0
    coded = sum(1 for t in result.tensors if t.layout != "raw")
    if as_json:
        doc = {
            "input": str(model), "output": str(result.output), "original_bytes": result.original_bytes,
            "dcz_bytes": result.dcz_bytes, "ratio": result.ratio, "seconds": seconds,
            "tensors": [t.__dict__ | {"shape": list(t.shape)} for t in result.tensors],
            "fidelity": [f.__dict__ for f in result.fidelity] if result.fidelity is not None else None,
        }
        if alloc is not None:
            doc["fidelity"] = [f.__dict__ for f in verified.fidelity]
            doc["target"] = {"goal": str(alloc.target), "met": verified.met, "verified_on": verified.on,
                             "detail": verified.detail, "expected_changes": verified.expected_changes,
                             "evaluations": alloc.evaluations,
                             "allocation_seconds": alloc.seconds,
                             "choices": [{"name": c.name, "rel_error": c.candidate.rel_error,
                                          "per_channel": c.candidate.per_channel,
                                          "input_weighted": c.candidate.weighted, "sensitivity": c.sensitivity}
                                         for c in alloc.choices],
                             "kept_at_policy": alloc.fixed,
                             "validation": None if alloc.validation is None else {
                                 "summary": str(alloc.validation), "margin": alloc.validation.margin,
                                 "held_out_agreement": alloc.validation.agreement,
                                 "all_folds_met": alloc.validation.passed,
                                 "new_items_differ_at_most": alloc.validation.flip_bound,
                                 "folds": [f._asdict() for f in alloc.validation.folds]}}
        click.echo(json.dumps(doc, indent=2))
        if alloc is not None and not verified.met:
            sys.exit(EXIT_ERROR)
        return
    if not quiet:
        click.echo(f"{model} -> {result.output}: {result.original_bytes:,} -> {result.dcz_bytes:,} bytes "
                   f"({result.ratio:.2f}x) in {seconds:.1f} s; {coded} of {len(result.tensors)} weights coded")
        if result.dcz_bytes > result.original_bytes:
            if not result.tensors:
                why = "the model has no weight tensor to code (its parameters, if any, are node attributes)"
            elif not coded:
                why = (f"no weight was coded (weights under --min-elements, {policy.min_elements:,}, or set raw are "
                       f"stored as they are)")
            else:
                why = "coding the weights saved less than the container costs"
            if not coded:
                why += "; the file's header, index and metadata only add to it"
            click.echo(f"dcz: note: the .dcz is larger than the original: {why}", err=True)
        if alloc is not None:
            pc = sum(c.candidate.per_channel for c in alloc.choices)
            iw = sum(c.candidate.weighted and c.candidate.rel_error > 0 for c in alloc.choices)
            errs = sorted(c.candidate.rel_error for c in alloc.choices)
            span = f", rounding error {errs[0]:.1e}..{errs[-1]:.1e} of channel or tensor RMS" if errs else ""
            click.echo(f"target {alloc.target}: {'met' if verified.met else 'NOT met'} on the {verified.on} "
                       f"({verified.detail}); {len(alloc.choices)} tensors allocated ({pc} per-channel, "
                       f"{iw} with steps per layer input){span}; "
                       f"{alloc.evaluations} model runs in {alloc.seconds:.1f} s")
            if alloc.validation is not None:
                click.echo(f"held-out estimate: {alloc.validation}")
            click.echo(_fidelity_table(verified.fidelity))
        if result.fidelity is not None:
            if check_inputs is None and alloc is None:
                click.echo("fidelity on random inputs (a weak check: use --inputs with real data):")
            click.echo(_fidelity_table(result.fidelity))
    if alloc is not None and not verified.met:
        why = ("no setting met it on the calibration inputs, so the finest grids were used" if not alloc.met else
               "it is met on the calibration inputs but not on the check inputs")
        click.echo(f"dcz: error: target {alloc.target} not met: {why}; the file was written to {result.output} "
                   f"for inspection", err=True)
        sys.exit(EXIT_ERROR)


@main.command()
@click.argument("dcz", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx (default: DCZ with .onnx).")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def decompress(dcz, output, force, quiet):
    """Rebuild the ONNX model stored in DCZ (onnx.checker-valid, runs in onnxruntime)."""
    from . import api

    t0 = time.perf_counter()
    with _progress("decompress", quiet) as progress:
        out = api.decompress(dcz, output, overwrite=force, progress=progress)
    if not quiet:
        click.echo(f"{dcz} -> {out}: {out.stat().st_size:,} bytes in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("dcz", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable breakdown on stdout.")
@click.option("--all", "show_all", is_flag=True, help=f"List every tensor (default: the {INSPECT_TOP} largest).")
@click.option("--paper", is_flag=True,
              help="Deep Compression's per-layer columns: weights, % kept, code and index bits before and after "
                   "Huffman coding (per kept weight), compress rate; with --all, raw tensors too.")
def inspect(dcz, as_json, show_all, paper):
    """Show where every byte of DCZ went, per tensor and per stream, beside the entropy bound.

    Reads only the file's index, so it is instant on any file size.
    """
    from .report import breakdown, format_paper_table, format_table, to_json

    b = breakdown(dcz)
    if as_json:
        click.echo(to_json(b))
    elif paper:
        click.echo(format_paper_table(b, include_raw=show_all))
    else:
        click.echo(format_table(b, top=None if show_all else INSPECT_TOP))


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A .npz of real inputs keyed by graph input name (default: random inputs, with a warning).")
@click.option("--errors", default="1e-3,3e-3,1e-2,3e-2,1e-1", show_default=True, metavar="E,E,...",
              help="Weight rounding errors to try (fractions of each channel's RMS).")
@click.option("--min-elements", type=click.IntRange(0), default=DEFAULT_MIN_ELEMENTS, show_default=True,
              help="Smaller tensors are left out (dcz compress stores them raw).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also draw the curves to this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def sensitivity(model, calibration_path, errors, min_elements, plot, as_json, quiet):
    """How much each weight tensor matters: the worst output error when only that tensor is rounded.

    For every compressible tensor and each rounding error, the model runs in onnxruntime on the calibration
    inputs with just that tensor rounded to a grid (per output channel); the table lists the worst relative L2
    error over the outputs and the estimated coded size, most sensitive first. dcz compress --target uses the
    same measurements to give sensitive tensors finer grids.
    """
    from . import allocate
    from .fidelity import load_inputs

    try:
        errs = tuple(float(e) for e in errors.split(","))
    except ValueError:
        raise click.UsageError(f"--errors {errors!r}: expected numbers separated by commas") from None
    if not all(0 < e < 1 for e in errs):
        raise click.UsageError(f"--errors {errors!r}: each must be in (0, 1)")
    calibration = load_inputs(calibration_path) if calibration_path is not None else None
    if calibration is None:
        from .onnx_ingest import load_model

        calibration = allocate.calibration_inputs(load_model(model, load_external=False), None,
                                                  warn=lambda m: click.echo(f"dcz: warning: {m}", err=True))
    with _progress("sensitivity", quiet or as_json) as progress:
        rows = allocate.sensitivity_table(model, Policy(min_elements=min_elements), calibration, errs, progress=progress)
    rows.sort(key=lambda r: -max(r.rel_l2))
    if plot is not None:
        allocate.plot_sensitivity(rows, plot)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    head = f"{'tensor':<40} {'kind':<6} {'elements':>10} {'grid':<8}" + "".join(f" {'e=' + format(e, 'g'):>10}" for e in errs)
    click.echo("worst output rel L2 with only this tensor rounded (estimated KB in brackets)")
    click.echo(head)
    for r in rows:
        cells = "".join(f" {v:>10.2e}" for v in r.rel_l2)
        click.echo(f"{r.name[-40:]:<40} {r.kind:<6} {r.numel:>10,} {'channel' if r.per_channel else 'tensor':<8}{cells}")
        click.echo(f"{'':<66}" + "".join(f" {'(' + format(b / 1e3, '.1f') + ')':>10}" for b in r.est_bytes))
    if plot is not None:
        click.echo(f"plot: {plot}")


@main.command()
@click.option("--model", type=click.Choice(["lenet300", "lenet5"]), default="lenet300", show_default=True)
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Keep the files in this folder.")
def demo(model, keep):
    """Compress a bundled LeNet trained on real MNIST digits, show the breakdown, and compare accuracy."""
    from .demo import run_demo

    run_demo(model, keep)


if __name__ == "__main__":
    main()
