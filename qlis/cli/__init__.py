"""The command line: ``qlis`` (main: the command table, each command imported when it
runs; info: an archive's header, without torch; model_commands: inspect, pack, demo; unpack;
progress: the bars they draw) and what ``qlis-iqa`` shares with it (console: errors, paths,
tables; choices: codecs and devices)."""
