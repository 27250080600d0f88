from gptq_worker.cli import entry

entry()
