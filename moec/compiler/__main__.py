import sys

from moec.compiler.cli import main

sys.exit(main())
