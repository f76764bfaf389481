import sys

from hrnet_cls.export.folder import main

sys.exit(main())
