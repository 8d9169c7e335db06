"""The emulator's one exception class and the helper that formats its messages (STYLE.md, "Errors")."""


class NkiEmulatorError(ValueError):
    """A kernel did something the documented NKI API, the compiler or the hardware rejects.

    Messages read ``<where>: <what>=<value>; <rule>``, where ``<rule>`` names the limit and its source.
    """


def check(cond: object, where: str, message: str) -> None:
    """Raise ``NkiEmulatorError("<where>: <message>")`` unless ``cond`` holds."""
    if not cond:
        raise NkiEmulatorError(f"{where}: {message}")
