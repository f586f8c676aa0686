"""The `visionserve` command: call the service's functions from a terminal.

`cli` parses the command line, `interactive` asks the seed program's questions, `service`
talks HTTP and turns every failure into a message plus an exit code, `progress` draws the
bar while a long Segment Anything job runs.
"""
