"""The `rescue` command line: one subcommand per pipeline stage, wired from the stage packages."""
