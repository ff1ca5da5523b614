// The command line: every command with its flags, help and examples in one table (command_line.cpp), from which
// the parser, `--help`, the bash completion (`--completion bash`) and docs/commands.md (`--reference`) are made.
#pragma once

namespace loratune {

// Parses `argv`, runs the command it names and returns the process exit code (2 for a bad command line).
int run_command_line(int argc, char** argv);

}  // namespace loratune
