"""`edgetune devices` and the `--device` option shared by train / predict / benchmark."""

from __future__ import annotations

import json

import click

from devices.select import ACCEPTED_FORMS, normalize_request
from toolkit.errors import DeviceError

DEVICE_HELP = f"Where to run: {ACCEPTED_FORMS}. `edgetune devices` lists what this machine has."


class DeviceParamType(click.ParamType):
    """A --device value with valid syntax (whether the device exists is checked when it is used)."""

    name = "device"

    def convert(self, value, param, ctx):
        try:
            return normalize_request(str(value))
        except DeviceError as error:
            self.fail(str(error), param, ctx)


DEVICE = DeviceParamType()


def device_option(*, default: str = "auto", help: str = DEVICE_HELP):
    """Decorator adding `--device TEXT` (default auto) to a click command."""
    return click.option("--device", "device", type=DEVICE, default=default, show_default=True, help=help)


@click.command("devices")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of device objects; problems go to stderr."
)
def devices_command(as_json: bool) -> None:
    """List every usable device per runtime (PyTorch, OpenVINO, ONNX Runtime).

    The id column is what --device takes; uses says what edgetune runs there (train the head,
    extract features with the frozen backbone, run exported models, fine-tune the backbone).
    """
    from devices.probe import detect_devices

    report = detect_devices()
    if as_json:
        click.echo(json.dumps([device.to_json() for device in report.devices], indent=2))
        for problem in report.problems:
            click.echo(f"warning: {problem}", err=True)
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Devices")
    for column in ("runtime", "kind", "id", "name", "uses", "precisions"):
        table.add_column(column, overflow="fold")
    for device in report.devices:
        table.add_row(
            device.runtime.value,
            device.kind.value + (" (static shapes)" if device.static_shapes else ""),
            device.id,
            escape(device.name),
            ", ".join(use.value for use in device.uses),
            ", ".join(device.precisions) or "-",
        )
    console = Console()
    console.print(table)
    for problem in report.problems:
        console.print(f"[yellow]warning: {escape(problem)}[/yellow]")
