import sys

from hrnet_cls.shards.cli import main

sys.exit(main())
