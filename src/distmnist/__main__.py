import sys

from distmnist.cli import main

sys.exit(main())
