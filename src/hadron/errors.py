"""User-facing errors: what happened, where, and what to do."""

from __future__ import annotations


class HadronError(Exception):
    """An error a user can hit. The CLI prints it without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class RecipeError(HadronError):
    """One or more recipes are invalid; ``problems`` holds ``file: field: problem`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid recipe(s):\n" + "\n".join(f"  {p}" for p in problems),
            hint="fix the fields named above; `hadron show PKG` prints a recipe as Hadron reads it",
        )


class FetchError(HadronError):
    pass


class SandboxError(HadronError):
    pass


class BuildError(HadronError):
    pass
