import sys

from moec.runtime.cli import main

sys.exit(main())
