import sys

from kvmesh.runtime.cli import main

sys.exit(main())
