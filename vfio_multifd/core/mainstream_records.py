"""Top-level records of QEMU's main stream other than sections: the
configuration's subsections, QEMU_VM_COMMAND, the VM description
(``savevm.c``; PROTOCOL.md section 7).

Pure functions of a :class:`Cursor`: each returns what the record says or
raises the protocol error ``error`` builds (it knows where the record began).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ProtocolError, Reason
from .mainstream_cursor import U16, U32, Cursor
from .savevm import (
    MAX_CAPABILITIES,
    MAX_MACHINE_NAME,
    REFUSED_CAPABILITIES,
    REFUSED_COMMANDS,
    Command,
    CommandEvent,
    Configuration,
    description_problem,
)

ErrorFactory = Callable[[Reason, str], ProtocolError]


def configuration_record(cursor: Cursor, error: ErrorFactory) -> Configuration:
    """QEMU_VM_CONFIGURATION after its type byte: the machine's name; its
    subsections follow."""
    size = cursor.unpack(U32)
    if size > MAX_MACHINE_NAME:
        raise error(
            Reason.MAIN_RECORD,
            f"configuration: machine name of {size} bytes, at most {MAX_MACHINE_NAME}",
        )
    return Configuration(cursor.take(size).decode("utf-8", "surrogateescape"))


def configuration_subsection(
    cursor: Cursor, config: Configuration, page_size: int, error: ErrorFactory
) -> Configuration:
    """One subsection of the configuration (``savevm.c``), after its
    QEMU_VM_SUBSECTION byte: ``config`` with what it adds."""
    name = cursor.name()
    cursor.unpack(U32)  # its version
    if name == "configuration/target-page-bits":
        bits = cursor.unpack(U32)
        if not 9 <= bits <= 30 or 1 << bits != page_size:
            raise error(
                Reason.MAIN_UNSUPPORTED,
                f"target page size 2**{bits}; this destination takes {page_size}-byte pages",
            )
    elif name == "configuration/capabilities":
        count = cursor.unpack(U32)
        if count > MAX_CAPABILITIES:
            raise error(Reason.MAIN_RECORD, f"{count} capabilities, at most {MAX_CAPABILITIES}")
        capabilities = tuple(cursor.name() for _ in range(count))
        for capability in capabilities:
            if capability in REFUSED_CAPABILITIES:
                raise error(
                    Reason.MAIN_UNSUPPORTED,
                    f"the source uses {REFUSED_CAPABILITIES[capability]}, which this "
                    "destination does not take",
                )
        config = Configuration(config.machine, config.capabilities + capabilities, config.uuid)
    elif name == "configuration/uuid":
        uuid = cursor.take(16)
        config = Configuration(config.machine, config.capabilities, uuid)
    else:
        raise error(Reason.MAIN_RECORD, f"unknown configuration subsection {name!r}")
    return config


def command_event(cursor: Cursor, error: ErrorFactory) -> CommandEvent:
    """A QEMU_VM_COMMAND record after its type byte; the commands this
    destination does not take are refused."""
    number, size = cursor.unpack(U16), cursor.unpack(U16)
    data = cursor.take(size)
    try:
        command = Command(number)
    except ValueError:
        raise error(Reason.MAIN_RECORD, f"unknown QEMU_VM_COMMAND {number}") from None
    if command in REFUSED_COMMANDS:
        raise error(
            Reason.MAIN_UNSUPPORTED,
            f"QEMU_VM_COMMAND {command.name}: the source uses {REFUSED_COMMANDS[command]}, "
            "which this destination does not take",
        )
    return CommandEvent(command, data)


def vm_description(cursor: Cursor, max_description: int, error: ErrorFactory) -> bytes:
    """QEMU_VM_VMDESCRIPTION's body after its type byte: a be32 length and a
    JSON object with a ``devices`` list."""
    size = cursor.unpack(U32)
    if size > max_description:
        raise error(
            Reason.MAIN_RECORD,
            f"VM description of {size} bytes, at most {max_description}",
        )
    body = cursor.take(size)
    problem = description_problem(body)
    if problem:
        raise error(Reason.MAIN_RECORD, f"VM description: {problem}")
    return body
