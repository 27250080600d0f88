import sys

from gptq_worker.cli import main

sys.exit(main())
