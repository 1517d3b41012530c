"""The top floor: the `aipd` command, which attaches every stage's commands, and `aipd demo`, which drives them all.

Nothing below imports this package: the stages (`training`, `tuning`, `serving`, `ui`, `cluster`) define their
commands on the core's shared leaf (`app.cli_common`) and are attached here, the way Ray's `scripts` attaches
`serve_cli`.
"""
