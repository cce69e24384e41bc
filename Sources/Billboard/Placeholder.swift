// Billboard: see helper
