"""`ddpm-export`: a model -> validated ONNX files (+ a TensorRT engine where TensorRT and a GPU exist).

    ddpm-export SOURCE [options]                export (the default command; `ddpm-export export SOURCE` also works)
    ddpm-export build-engine MODEL.fp16.onnx    build a TensorRT plan later, on a GPU host
    ddpm-export triton-repo EXPORT_DIR --out R  a model repository for the official Triton containers
    ddpm-export to-diffusers CKPT --out DIR     the checkpoint as a diffusers DDPMPipeline folder
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from runtime.cli_common import (CONTEXT, FINITE, POSITIVE, DefaultCommandGroup, force_option, model_argument,
                                run_cli)
from runtime.sampling import DEFAULT_SAMPLER, DEFAULT_SOLVER_STEPS
from runtime.serving.sampler import DEFAULT_MAX_CALLS


@click.group(cls=DefaultCommandGroup, default_command="export", context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-export")
def cli() -> None:
    """Export a model (ddpm-train checkpoint, diffusers folder, improved-diffusion state dict) to ONNX (FP32, FP16,
    one-step graph) and optionally a TensorRT engine."""


def _batch_options(f):
    f = click.option("--opt-batch", type=int, default=None, help="TensorRT profile's optimal batch [max batch]")(f)
    f = click.option("--min-batch", type=int, default=1, show_default=True, help="smallest batch for TensorRT")(f)
    return f


@cli.command("export")
@model_argument
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="output folder  [default: <checkpoint folder>/export, or <model name>-export beside a diffusers "
                   "folder; in the current folder for a hub id or a folder inside the Hugging Face cache]")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="also write the mixed-precision FP16 ONNX")
@click.option("--step-graph/--no-step-graph", default=True, show_default=True,
              help="also write the one-step sampler graph (x_t, t, noise -> x_prev)")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18)")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="largest batch validated and put in the TensorRT profile")
@_batch_options
@click.option("--engine/--no-engine", default=None,
              help="build the TensorRT engine: --engine requires it, --no-engine skips it  [default: if possible]")
@click.option("--validate/--no-validate", default=True, show_default=True, help="check the graphs numerically")
@click.option("--fuse", is_flag=True, help="also write FP16 graphs fused by ONNX Runtime's unet optimizer into "
              "<out-dir>/fused/ (CUDA only; validated there against FP32 when onnxruntime has CUDA)")
@force_option("Overwrite existing outputs.")
def export_cmd(model: Path, out_dir: Path | None, fp16: bool, step_graph: bool, opset: int, max_batch: int,
               min_batch: int, opt_batch: int | None, engine: bool | None, validate: bool, fuse: bool, force: bool,
               source_options: dict[str, Any]) -> None:
    """Export MODEL: a .pt written by ddpm-train, a diffusers folder (pipeline or UNet2DModel) or the hub id of one in
    the local Hugging Face cache, or an improved-diffusion .pt with --flags."""
    from ddpm_export.pipeline import export_all
    from train.sources import hub, load_source

    source = load_source(model, **source_options)
    if hub.is_hub_id(model) or hub.in_cache(model):  # outputs never land inside the cache
        default_dir = Path(f"{hub.export_name(model)}-export")
    else:
        default_dir = model.parent / f"{model.name}-export" if model.is_dir() else model.parent / "export"
    if fuse:
        from ddpm_export.fuse import check_fused_outputs

        check_fused_outputs(out_dir or default_dir, force)
    written = export_all(source, out_dir or default_dir, fp16=fp16, step_graph=step_graph,
                         max_batch=max_batch, opset=opset, validate=validate, engine=engine, force=force,
                         min_batch=min_batch, opt_batch=opt_batch)
    if fuse:
        from ddpm_export.fuse import fuse_export

        written.update(fuse_export(out_dir or default_dir, validate=validate, max_batch=min(max_batch, 4)))
    for key, path in written.items():
        click.echo(f"{key:>16}: {path}")
    click.echo(_verdict(written.get("validation")))
    if "fused_validation" in written:
        report = json.loads(written["fused_validation"].read_text())
        click.echo("fused graphs: " + ("validated on CUDA: " + ("passed" if report["passed"] else "FAILED")
                                       if report["passed"] is not None else report["reason"]))


def _verdict(report_path: Path | None) -> str:
    """The export's one-line verdict: validation passed with its worst errors, or skipped (failures raise)."""
    if report_path is None:
        return "validation skipped (--no-validate): the graphs were not checked against the model"
    summary = json.loads(Path(report_path).read_text())["summary"]
    worst = ", ".join(f"{name.replace('_', ' ')} {value:.2e}" for name, value in summary.items() if value is not None)
    return f"validation passed: {worst}"


@cli.command("build-engine")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--plan", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="engine file  [default: MODEL with .onnx replaced by .plan]")
@click.option("--max-batch", type=int, default=None, help="largest batch  [default: the export's max batch]")
@_batch_options
@click.option("--opt-level", type=int, default=3, show_default=True, help="builder optimization level 0..5")
@force_option("Overwrite an existing engine.")
def build_engine_cmd(model: Path, plan: Path | None, max_batch: int | None, min_batch: int, opt_batch: int | None,
                     opt_level: int, force: bool) -> None:
    """Build a TensorRT engine from MODEL (model.fp16.onnx) on this GPU."""
    from ddpm_export.engine import build_engine
    from ddpm_export.onnx_io import load_onnx, read_info
    from ddpm_export.pipeline import check_batch_range

    if max_batch is None:
        max_batch = int(read_info(load_onnx(model), str(model)).extra.get("max_batch", 64))
    profile = check_batch_range(min_batch, opt_batch, max_batch)
    plan = plan or model.with_name(model.name.removesuffix(".onnx") + ".plan")
    for key, path in build_engine(model, plan, profile, optimization_level=opt_level, force=force).items():
        click.echo(f"{key:>10}: {path}")


@cli.command("triton-repo")
@click.argument("export_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="repository folder to write")
@click.option("--graph", default=None, help="eps graph to serve  [default: the export's .plan if any, else model.onnx]")
@click.option("--kind", type=click.Choice(("gpu", "cpu")), default="gpu", show_default=True,
              help="where the eps model's instances run")
@click.option("--instances", type=int, default=1, show_default=True, help="eps model instances (per GPU)")
@click.option("--sampler-instances", type=int, default=2, show_default=True, help="sampling-loop instances")
@click.option("--max-batch", type=int, default=None, help="Triton max_batch_size  [default: the export's]")
@click.option("--queue-delay-us", type=int, default=2000, show_default=True, help="dynamic batcher's wait")
@click.option("--sampler", default=DEFAULT_SAMPLER, show_default=True,
              help="default sampler of requests that name none")
@click.option("--steps", default=None,
              help=f"default steps (as ddpm-run --steps)  [default: {DEFAULT_SOLVER_STEPS} for the solvers, all T for "
              "ddpm and ddim]")
@click.option("--spacing", default=None, help="default spacing (as ddpm-run --spacing)")
@click.option("--eta", type=FINITE, default=None, help="default DDIM eta of ddim requests  [default: 0]")
@click.option("--max-model-calls", type=POSITIVE, default=None,
              help="most model calls per image a request's chain may take; longer ones are refused  [default: "
              f"{DEFAULT_MAX_CALLS}, or the default chain's when longer]")
@force_option("Replace an existing repository folder.")
def triton_repo_cmd(export_dir: Path, out: Path, graph: str | None, kind: str, instances: int,
                    sampler_instances: int, max_batch: int | None, queue_delay_us: int, sampler: str,
                    steps: str | None, spacing: str | None, eta: float | None, max_model_calls: int | None,
                    force: bool) -> None:
    """Write a model repository for the official Triton containers from EXPORT_DIR (see README, Serving)."""
    from runtime.serving.triton_repo import write_repository

    written = write_repository(export_dir, out, graph=graph, kind=kind, instances=instances,
                               sampler_instances=sampler_instances, max_batch=max_batch,
                               queue_delay_us=queue_delay_us, sampler=sampler, steps=steps, spacing=spacing,
                               eta=eta, max_model_calls=max_model_calls, force=force)
    for name, path in written.items():
        click.echo(f"{name:>10}: {path}")


@cli.command("to-diffusers")
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="DDPMPipeline folder to write")
@force_option("Replace an existing folder.")
def to_diffusers_cmd(checkpoint: Path, out: Path, force: bool) -> None:
    """Write CHECKPOINT (a ddpm-train .pt) as a diffusers DDPMPipeline folder (unet/, scheduler/, model_index.json)
    that DDPMPipeline.from_pretrained loads."""
    from ddpm_export.to_diffusers import write_pipeline

    click.echo(f"wrote {write_pipeline(checkpoint, out, force=force)} (DDPMPipeline: unet + DDPMScheduler)")


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "ddpm-export", argv)
