import sys

from distmnist.tools.cli import main

sys.exit(main())
