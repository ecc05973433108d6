from hierarchy.core.phases import phase

with phase("import hierarchy.commands.cli"):
    from hierarchy.commands.cli import entry

entry()
